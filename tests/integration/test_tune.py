"""jobs.tune end to end on the session's local Ray: real Ray Train trials, ASHA, best.json into jobs.train.

One tune runs for the whole module (three smoke trials, two epochs each at most). Its space makes two
trials clearly worse whatever training does: a 1-dimensional embedding puts every image on one of two
points, so three classes cannot all be told apart, while 32 dimensions already separate the colour-coded
test classes perfectly. ASHA (grace 1 epoch, factor 2) must stop such a trial after its first epoch.
"""

import json
import os
import pickle
import re

import pytest
from PIL import Image

from jobs import prepare, tune
from lib.config import parse_config
from lib.training import HPARAM_KEYS, METRIC, PRESETS, TrainConfig

pytestmark = pytest.mark.usefixtures("ray_session")

SPACE = "margin: {uniform: [0.1, 0.4]}\nlr: {loguniform: [1.0e-3, 5.0e-3]}\nembedding_dim: {grid: [32, 1, 1]}\n"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from tests.conftest import make_image_folder

    root = tmp_path_factory.mktemp("tune")
    folder = make_image_folder(root / "images", train_per_class=32, test_per_class=4)
    data = prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(root / "data"),
                                              val_fraction=0.25))
    (root / "space.yaml").write_text(SPACE)
    args = ["--data-dir", str(data), "--run-dir", str(root / "run"), "--backbone", "resnet50", "--preset", "smoke",
            "--space", str(root / "space.yaml"), "--num-samples", "1", "--epochs", "2", "--grace-period", "1",
            "--reduction-factor", "2"]
    code = tune.cli(args)
    return {"code": code, "args": args, "out": root / "run" / "tune" / "resnet50"}


def table(out):
    """trials.md as dicts: header cells -> row cells."""
    lines = [line for line in (out / "trials.md").read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[1:]]


def test_smoke_tune_writes_the_trial_table_the_picture_and_best_json(tuned):
    assert tuned["code"] == 0
    out = tuned["out"]
    rows = table(out)
    assert len(rows) == 3 and list(rows[0]) == ["trial", "margin", "lr", "embedding_dim", "epochs",
                                                f"best {METRIC}", "status"]
    assert all(0.0 <= float(row[f"best {METRIC}"]) <= 1.0 for row in rows)

    best = json.loads((out / "best.json").read_text())
    assert set(best) == {*HPARAM_KEYS, METRIC, "backbone", "preset"}
    assert (best["backbone"], best["preset"], best["embedding_dim"]) == ("resnet50", "smoke", 32)
    assert 0.1 <= best["margin"] <= 0.4 and 1e-3 <= best["lr"] <= 5e-3
    assert (best["miner"], best["weight_decay"]) == ("all", 1e-4)  # the smoke preset's, not searched
    top = max(rows, key=lambda row: float(row[f"best {METRIC}"]))
    assert top["trial"].endswith("(best)") and float(top[f"best {METRIC}"]) == round(best[METRIC], 4)
    assert (top["margin"], top["lr"]) == (f"{best['margin']:.4g}", f"{best['lr']:.4g}")

    picture = Image.open(out / "tune.png")
    assert picture.size[0] > 600 and len(picture.getcolors(maxcolors=1 << 20) or []) > 20
    record = json.loads((out / "trials.json").read_text())  # the project's record, for resuming
    assert sorted(entry["status"] for entry in record["trials"]) == sorted(row["status"] for row in rows)
    assert len(list((out / "train").iterdir())) == 3  # each trial's Ray Train run and checkpoint


def test_with_mlflow_the_tune_is_a_run_and_each_trial_a_child_run(tuned, mlflow_server, capsys):
    """A rerun with --mlflow of a finished tune (nothing to train) logs what the first run wrote: the tune's run
    with its report files, each trial of trials.json a child run with its hyper-parameters and val mAP@5 per epoch."""
    from mlflow.tracking import MlflowClient

    out = tuned["out"]
    assert tune.cli([*tuned["args"], "--mlflow", mlflow_server["uri"]]) == 0
    assert "logged resnet50's tune (3 trial(s) as child runs)" in capsys.readouterr().err
    client = MlflowClient(mlflow_server["uri"])
    experiment = client.get_experiment_by_name(out.parents[1].name).experiment_id
    [parent] = client.search_runs([experiment], "tags.stage = 'tune'")
    best = json.loads((out / "best.json").read_text())
    assert parent.data.metrics["best.val_map_at_5"] == best[METRIC]
    assert {"best.json", "trials.md", "tune.png", "trials.json"} <= {a.path for a in client.list_artifacts(
        parent.info.run_id)}
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    record = {entry["trial_id"]: entry for entry in json.loads((out / "trials.json").read_text())["trials"]}
    assert sorted(child.info.run_name for child in children) == sorted(record)
    for child in children:
        entry = record[child.info.run_name]
        assert child.data.tags["trial_status"] == entry["status"]
        assert child.data.params["embedding_dim"] == str(entry["config"]["embedding_dim"])
        history = client.get_metric_history(child.info.run_id, "val_map_at_5")
        assert sorted((m.step, m.value) for m in history) == [tuple(row) for row in entry["history"] if row[1] is not None]


def test_asha_stops_a_clearly_worse_trial_after_its_grace_epoch(tuned):
    rows = table(tuned["out"])
    good = [row for row in rows if row["embedding_dim"] == "32"]
    stopped = [row for row in rows if row["status"] == "stopped early"]
    assert [(row["epochs"], row["status"]) for row in good] == [("2", "completed")]
    assert stopped and all(row["embedding_dim"] == "1" and row["epochs"] == "1" for row in stopped)
    assert all(float(row[f"best {METRIC}"]) < float(good[0][f"best {METRIC}"]) for row in stopped)


def test_jobs_train_takes_best_json_as_its_hyper_parameters(tuned):
    best_path = tuned["out"] / "best.json"
    best = json.loads(best_path.read_text())
    # the same parse and resolve jobs.train's main runs before it trains
    cfg = parse_config(TrainConfig, ["--data-dir", "d", "--run-dir", "r", "--preset", "quick",
                                     "--hparams", str(best_path)]).resolve()
    assert {key: getattr(cfg, key) for key in HPARAM_KEYS} == {key: best[key] for key in HPARAM_KEYS}
    assert cfg.epochs == PRESETS["quick"]["epochs"] and cfg.hparams == ""  # everything else is still the quick preset's


def test_a_finished_tune_is_not_rerun_and_a_lost_report_comes_back_from_tunes_state(tuned, capsys):
    out = tuned["out"]
    best_before = (out / "best.json").read_text()
    assert tune.cli(tuned["args"]) == 0
    assert "already tuned with these settings" in capsys.readouterr().err

    # Without best.json (as after a crash between Tune's end and the report) the rerun restores
    # Tune's experiment, finds every trial finished, and writes the same report without training.
    (out / "best.json").unlink()
    checkpoints = sorted(path.name for path in (out / "train").rglob("checkpoint_*"))
    assert tune.cli(tuned["args"]) == 0
    assert "resuming the interrupted tune" in capsys.readouterr().err
    assert (out / "best.json").read_text() == best_before
    assert sorted(path.name for path in (out / "train").rglob("checkpoint_*")) == checkpoints


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_crafted_pickles_in_tunes_folder_never_run_and_the_record_resumes_the_rest(tuned, capsys, tmp_path):
    """Tune's restore would unpickle tuner.pkl, the searcher's state and the trials' error.pkl: the rerun
    reads none of them. A trial the record does not hold as finished runs again; the others are kept."""
    out = tuned["out"]
    marker = tmp_path / "ran"
    payload = pickle.dumps(_RunsCode(marker))
    for name in ("tuner.pkl", "searcher-state-2026-01-01_00-00-00.pkl", "basic-variant-state-x.json"):
        (out / "trials" / name).write_bytes(payload)
    for folder in (path for path in (out / "trials").iterdir() if path.is_dir()):
        (folder / "error.pkl").write_bytes(payload)
    record = json.loads((out / "trials.json").read_text())
    interrupted = next(entry for entry in record["trials"] if entry["status"] == "stopped early")
    interrupted["status"] = "running"  # as if the job had been stopped during this trial
    (out / "trials.json").write_text(json.dumps(record))
    (out / "best.json").unlink()
    runs_before = {path.name for path in (out / "train").iterdir()}

    assert tune.cli(tuned["args"]) == 0
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "2 of 3 trial(s) finished, 1 to run" in err, err
    new_runs = {path.name for path in (out / "train").iterdir()} - runs_before
    assert len(new_runs) == 1  # only the interrupted trial trained again
    rows = table(out)
    assert len(rows) == 3 and interrupted["trial_id"] not in {row["trial"].split()[0] for row in rows}
    assert json.loads((out / "best.json").read_text())["embedding_dim"] == 32


@pytest.mark.parametrize("record", ["not json", '{"trials": [{"trial_id": "x"}]}',
                                    '{"trials": [], "__reduce__": 1}'])
def test_a_foreign_trial_record_fails_the_rerun_with_one_line(tuned, capsys, record):
    out = tuned["out"]
    saved = (out / "trials.json").read_text()
    best = (out / "best.json").read_text()
    (out / "best.json").unlink()
    (out / "trials.json").write_text(record)
    try:
        assert tune.cli(tuned["args"]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and "is not a trial record this project wrote" in lines[0], lines
    finally:
        (out / "trials.json").write_text(saved)
        (out / "best.json").write_text(best)


def test_rerunning_into_the_run_with_other_settings_fails_with_one_line(tuned, capsys):
    assert tune.cli([*tuned["args"], "--epochs", "3"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.search(r"holds a tune with other settings \(epochs differ\)", lines[0])


def test_tune_searches_the_loss_like_any_key_and_train_takes_the_winner(tmp_path):
    from tests.conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", train_per_class=32, test_per_class=4)
    data = prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(tmp_path / "data"),
                                              val_fraction=0.25))
    (tmp_path / "space.yaml").write_text("loss: {grid: [multi_similarity, proxy_anchor]}\nlr: 2.0e-3\n")
    code = tune.cli(["--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--backbone", "resnet50",
                     "--preset", "smoke", "--space", str(tmp_path / "space.yaml"), "--num-samples", "1",
                     "--epochs", "1", "--grace-period", "1"])
    assert code == 0
    out = tmp_path / "run" / "tune" / "resnet50"
    rows = table(out)
    assert sorted(row["loss"] for row in rows) == ["multi_similarity", "proxy_anchor"]
    assert all(row["status"] == "completed" and 0 <= float(row[f"best {METRIC}"]) <= 1 for row in rows)
    best = json.loads((out / "best.json").read_text())
    assert best["loss"] in ("multi_similarity", "proxy_anchor") and best["lr"] == 2e-3
    cfg = parse_config(TrainConfig, ["--data-dir", "d", "--run-dir", "r", "--hparams", str(out / "best.json")])
    assert cfg.resolve().loss == best["loss"]
