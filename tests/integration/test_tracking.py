"""--mlflow against a real MLflow server on 127.0.0.1 (tests/conftest.py's ``mlflow_server``): a smoke jobs.train and
jobs.evaluate log their runs, params, per-epoch metrics, artefacts and the registered model, read back through
MLflow's own client; a server that is down costs one line, never the job; without the flag nothing talks to it."""

import json
from pathlib import Path

import pytest
import torch

from jobs import evaluate, prepare, train
from lib.backbones import build_model
from tests.conftest import free_port, make_image_folder

pytestmark = pytest.mark.usefixtures("ray_session")

BACKBONE = "resnet50"


def requests_seen(server) -> int:
    """How many HTTP requests the server has answered (its log has one line per request)."""
    return sum('HTTP/1.1"' in line for line in server["log"].read_text().splitlines())


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, mlflow_server):
    """One smoke training of resnet50 with --mlflow; the RUN folder is named ``tracked-run`` (the experiment)."""
    root = tmp_path_factory.mktemp("tracking")
    folder = make_image_folder(root / "images", train_per_class=24, test_per_class=6)
    data = prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(root / "data")))
    run = root / "tracked-run"
    args = ["--data-dir", str(data), "--run-dir", str(run), "--preset", "smoke", "--train-per-class", "0",
            "--epochs", "2", "--backbones", BACKBONE]
    code = train.cli([*args, "--mlflow", mlflow_server["uri"]])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server["uri"])
    return {"code": code, "args": args, "data": data, "run": run, "client": client,
            "experiment": client.get_experiment_by_name("tracked-run")}


def runs_of(tracked, stage):
    return tracked["client"].search_runs([tracked["experiment"].experiment_id], f"tags.stage = '{stage}'")


def test_a_training_is_one_run_with_its_config_every_epoch_its_files_and_a_registered_model(tracked, tmp_path):
    assert tracked["code"] == 0 and tracked["experiment"] is not None
    client, out = tracked["client"], tracked["run"] / "models" / BACKBONE
    [run] = runs_of(tracked, "train")
    assert (run.info.run_name, run.info.status, run.data.tags["backbone"]) == (BACKBONE, "FINISHED", BACKBONE)
    config = json.loads((out / "config.json").read_text())
    params = run.data.params
    assert (params["backbones"], params["preset"], params["epochs"], params["embedding_dim"]) == (
        BACKBONE, "smoke", "2", str(config["embedding_dim"]))
    assert params["lr"] == str(config["lr"]) and params["loss_params.ms_alpha"] == "2.0"  # nested config, dotted
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = client.get_metric_history(run.info.run_id, "val_map_at_5")
    assert sorted((m.step, m.value) for m in logged) == [(row["epoch"], row["val_map@5"]) for row in history]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["best.val_map_at_5"] == summary["best"]["val_map@5"]

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.json", "metrics.jsonl", "loss_curve.png", "model"} <= names
    fetched = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(fetched).read_text()) == summary
    weights = client.download_artifacts(run.info.run_id, "model/model.pt", str(tmp_path))
    model = build_model(BACKBONE, weights, embedding_dim=config["embedding_dim"])  # weights_only load
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, config["embedding_dim"])

    [version] = client.search_model_versions(f"name = 'cifar-embeddings-{BACKBONE}'")
    assert version.run_id == run.info.run_id and version.source == f"runs:/{run.info.run_id}/model"
    assert (version.tags["backbone"], version.tags["embedding_dim"]) == (BACKBONE, str(config["embedding_dim"]))


def test_a_dead_server_is_one_line_and_a_rerun_logs_the_evaluation_it_missed(tracked, mlflow_server, capsys):
    eval_args = ["--data-dir", str(tracked["data"]), "--run-dir", str(tracked["run"]), "--tsne-points", "20",
                 "--grid-queries", "2", "--grid-k", "3"]
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert evaluate.cli([*eval_args, "--mlflow", dead]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "mlflow:" in line]
    assert len(said) == 1 and f"mlflow: {dead} unreachable (" in said[0], err
    assert "going on without tracking" in said[0] and "Connection refused" in said[0]
    metrics = json.loads((tracked["run"] / "eval" / "metrics.json").read_text())  # the evaluation finished
    assert runs_of(tracked, "evaluate") == []

    # the server is back: the rerun has nothing to compute and logs the finished evaluation; a third logs nothing
    for _ in range(2):
        assert evaluate.cli([*eval_args, "--mlflow", mlflow_server["uri"]]) == 0
        assert "nothing to do" in capsys.readouterr().err
    [run] = runs_of(tracked, "evaluate")
    assert run.info.status == "FINISHED"
    score = metrics["models"][BACKBONE]["L"]["map@5"]
    assert run.data.metrics[f"{BACKBONE}.L.map_at_5"] == score
    assert run.data.metrics[f"clusters.{BACKBONE}.nmi"] == metrics["clusters"][BACKBONE]["nmi"]
    names = {a.path for a in tracked["client"].list_artifacts(run.info.run_id)}
    pictures = {path.name for path in (tracked["run"] / "eval").glob("*.png")}
    assert pictures and {"metrics.json", "results.md", *pictures} <= names


def test_without_the_flag_nothing_talks_to_mlflow(tracked, mlflow_server, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = requests_seen(mlflow_server)
    assert train.cli(tracked["args"]) == 0  # finished: skipped, as with the flag a rerun would log it
    assert "mlflow" not in capsys.readouterr().err
    assert requests_seen(mlflow_server) == before
    # with MLFLOW_TRACKING_URI instead of the flag the same rerun is tracked, and finds its run logged already
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    assert train.cli(tracked["args"]) == 0
    assert requests_seen(mlflow_server) > before
    assert len(runs_of(tracked, "train")) == 1
