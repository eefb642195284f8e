"""jobs.train end to end on a local Ray: Ray Data -> Ray Train (DDP), faults, resume, several backbones."""

import json
import math

import pytest
import torch
from PIL import Image

from jobs import prepare, train
from lib.backbones import build_model
from lib.checkpoints import load_train_state, seal_checkpoint
from lib.losses import COLLAPSE_SPREAD

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import make_image_folder

    root = tmp_path_factory.mktemp("train")
    folder = make_image_folder(root / "images", train_per_class=40, test_per_class=8)
    return prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(root / "data")))


def history(run_dir, backbone):
    lines = (run_dir / "models" / backbone / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def smoke(data_dir, run_dir, *extra):
    return train.cli(["--data-dir", str(data_dir), "--run-dir", str(run_dir), "--preset", "smoke",
                      "--train-per-class", "0", "--epochs", "4", *extra])


def test_two_workers_learn_survive_a_worker_failure_and_write_outputs(data_dir, tmp_path):
    run = tmp_path / "run"
    code = smoke(data_dir, run, "--backbones", "resnet50", "--num-workers", "2",
                 "--inject-failure", "resnet50:2", "--max-failures", "1")
    assert code == 0
    out = run / "models" / "resnet50"
    rows = history(run, "resnet50")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]  # the failed epoch 2 was redone from epoch 1's checkpoint
    assert rows[2]["resumed_from"] == 1
    assert (out / ".failure-injected-at-2").exists()
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]  # the loss fell
    assert all(r["steps"] >= 2 and 0 <= r["active_fraction"] <= 1 for r in rows[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["num_workers"] == 2 and summary["epochs_run"] == 4
    assert summary["best"]["val_map@5"] == max(r["val_map@5"] for r in rows[1:])
    curve = Image.open(out / "loss_curve.png")
    assert curve.size[0] > 600 and len(curve.getcolors(maxcolors=1 << 20) or []) > 20
    model = build_model("resnet50", str(out / "model.pt"), embedding_dim=summary["config"]["embedding_dim"])
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert json.loads((out / "config.json").read_text())["preset"] == "smoke"


def test_one_failing_backbone_spares_the_other_and_a_rerun_resumes_it(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = smoke(data_dir, run, "--backbones", "vgg16,resnet50", "--inject-failure", "vgg16:3", "--max-failures", "0")
    err = capsys.readouterr().err
    assert code == 1 and "some backbones failed: vgg16" in err
    assert (run / "models" / "resnet50" / "summary.json").exists()
    assert not (run / "models" / "vgg16" / "summary.json").exists()

    code = smoke(data_dir, run, "--backbones", "vgg16,resnet50")
    err = capsys.readouterr().err
    assert code == 0
    assert "resnet50: already trained with this config" in err
    rows = history(run, "vgg16")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4] and rows[3]["resumed_from"] == 2

    # a changed config trains afresh instead of resuming the finished run's checkpoints; this one augments in
    # Ray Data's map tasks (--augment-on data) instead of on the worker's device
    code = smoke(data_dir, run, "--backbones", "vgg16", "--lr", "1e-3", "--epochs", "2", "--augment-on", "data")
    assert code == 0
    rows = history(run, "vgg16")
    assert [r["epoch"] for r in rows] == [0, 1, 2] and not any("resumed_from" in r for r in rows)
    assert all(r["steps"] >= 2 for r in rows[1:])
    summary = json.loads((run / "models" / "vgg16" / "summary.json").read_text())
    assert summary["config"]["lr"] == 1e-3 and summary["epochs_run"] == 2
    assert summary["config"]["augment_on"] == "data"


def test_a_shard_over_its_cache_budget_streams_the_cached_runs_first_epoch(data_dir, tmp_path):
    # two DDP workers, each over its own row groups: the same seed must train on the same batches either way
    args = ("--backbones", "resnet50", "--num-workers", "2", "--epochs", "1")
    assert smoke(data_dir, tmp_path / "cached", *args) == 0
    assert smoke(data_dir, tmp_path / "streamed", *args, "--cache-budget", "0") == 0
    [cached], [streamed] = history(tmp_path / "cached", "resnet50")[1:], history(tmp_path / "streamed", "resnet50")[1:]
    assert (cached["data_mode"], streamed["data_mode"]) == ("cached", "streamed")
    assert streamed["steps"] == cached["steps"] >= 2
    for key in ("train_loss", "active_fraction", "spread", "val_loss", "val_map@5"):  # same batches, same pixels
        assert streamed[key] == pytest.approx(cached[key], rel=1e-5, abs=1e-7), key
    summary = json.loads((tmp_path / "streamed" / "models" / "resnet50" / "summary.json").read_text())
    data = summary["train_data"]
    assert data["mode"] == "streamed" and 0.05 < data["peak_rss_gb"] < 64
    assert 0 < data["stream_buffer_gb"] * 2**30 < 200 * 32 * 32 * 3  # a few row groups of a worker's ~200 rows


def test_offline_imagenet_weights_fail_with_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    code = train.cli(["--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run"), "--preset", "smoke",
                      "--weights", "imagenet", "--backbones", "densenet121"])
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert code == 2 and lines == [lines[0]]
    assert "cannot load ImageNet weights for densenet121" in lines[0] and "--weights none" in lines[0]


# triplet trains in every other test here and proxy_anchor in the resume test below: the other two run here
@pytest.mark.parametrize("loss, column", [("multi_similarity", "mined_pair_fraction"), ("supcon", "similarity_gap")])
def test_each_loss_trains_on_the_smoke_preset_and_reports_its_own_statistics(data_dir, tmp_path, loss, column):
    run = tmp_path / "run"
    assert smoke(data_dir, run, "--backbones", "resnet50", "--loss", loss, "--epochs", "2") == 0
    rows = history(run, "resnet50")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r[column]) and r["spread"] > COLLAPSE_SPREAD
               and 0 <= r["val_map@5"] <= 1 for r in rows[1:])
    assert json.loads((run / "models" / "resnet50" / "summary.json").read_text())["config"]["loss"] == loss


def test_a_resumed_two_worker_proxy_anchor_run_continues_from_its_checkpointed_proxies(data_dir, tmp_path):
    run = tmp_path / "run"
    args = ("--backbones", "resnet50", "--loss", "proxy_anchor", "--epochs", "2", "--num-workers", "2")  # DDP
    assert smoke(data_dir, run, *args, "--inject-failure", "resnet50:2", "--max-failures", "0") == 1
    def checkpoints():  # beside them, Ray's checkpoint_manager_snapshot.json
        return [path for path in (run / "models" / "resnet50").glob("resnet50-*/checkpoint_*") if path.is_dir()]

    [checkpoint] = checkpoints()  # epoch 1's
    # Plant proxies 1,000 times longer than any a fresh start (norm ~5) or a few AdamW steps give: the losses
    # read proxies by cosine, so training goes on as before, but where the resumed run started is plain to see.
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    planted = state["objective"]["loss.proxies"] * 1000
    state["objective"]["loss.proxies"] = planted
    torch.save(state, checkpoint / "train_state.pt")
    seal_checkpoint(checkpoint)  # planted on purpose: its checkpoint.json says so, or the rerun would pass it over

    assert smoke(data_dir, run, *args) == 0
    rows = history(run, "resnet50")
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[2]["resumed_from"] == 1
    states = [load_train_state(folder)[1] for folder in checkpoints()]
    [after] = [s["objective"]["loss.proxies"] for s in states if s["history"][-1]["epoch"] == 2]
    assert after.shape == planted.shape and not torch.equal(after, planted)  # epoch 2 trained them on
    assert float((after - planted).norm() / planted.norm()) < 0.01  # from the checkpoint's proxies


def test_dry_run_prints_the_plan_and_leaves_run_and_the_cluster_alone(data_dir, tmp_path, capsys):
    """On a local Ray (the session's, no GPU): --dry-run --json is one JSON object on stdout, the CPU plan, and
    nothing is trained or written into RUN; without --json the same plan in words."""
    run = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--run-dir", str(run), "--preset", "smoke",
            "--backbones", "resnet50,vgg16", "--dry-run"]
    assert train.cli([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["on_gpu"], plan["gpus_requested"], plan["concurrent"]) == (False, 0, 2)
    assert [(b["name"], b["workers"], b["gpus_per_worker"], b["nodes"]) for b in plan["backbones"]] == [
        ("resnet50", 1, 0.0, 1), ("vgg16", 1, 0.0, 1)]
    assert plan["backbones"][0]["images_per_epoch"] == 16 * 3 and plan["backbones"][0]["steps_per_epoch"] >= 1
    assert train.cli(args) == 0
    text = capsys.readouterr().out
    assert "2 of 2 backbones at once, on CPUs" in text and "images per epoch" in text
    assert not run.exists()
    assert train.cli([*args[:-1], "--json"]) == 2  # --json alone is a mistake, said in one line
