"""jobs.pipeline end to end on tiny data: locally, resumed, and submitted as a Ray Job to a head on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import pipeline
from onray import pipeline as stages

pytestmark = pytest.mark.usefixtures("ray_session")

REPO = Path(__file__).resolve().parents[2]
BACKBONES = "resnet50,vgg16"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tests.conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("pipeline") / "images", train_per_class=24, test_per_class=8)


def args(images, run, *extra, backbones=BACKBONES):
    return ["--source", f"imagefolder:{images}", "--run-dir", str(run), "--preset", "smoke",
            "--backbones", backbones, *extra]


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_smoke_pipeline_end_to_end_then_a_rerun_does_no_work(images, tmp_path, capsys):
    run = tmp_path / "run"
    assert pipeline.cli(args(images, run)) == 0
    out = capsys.readouterr().out
    assert "| resnet50 |" in out and "| stacked |" in out and "results.md" in out
    assert json.loads((run / "data" / "manifest.json").read_text())["totals"]["test"] == 24
    for backbone in BACKBONES.split(","):
        assert (run / "models" / backbone / "summary.json").is_file()
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"resnet50", "vgg16", "resnet50-untrained", "vgg16-untrained", "stacked"}
    for name in ("tsne.png", "clusters.png", "retrieval_grid.png", "results.md"):
        assert (run / "eval" / name).stat().st_size > 0
    timings = json.loads((run / "pipeline.json").read_text())
    assert set(timings["stages_seconds"]) == {"prepare", "train", "evaluate"}

    before = mtimes(run / "data") | mtimes(run / "eval") | {
        f"models/{b}/model.pt": (run / "models" / b / "model.pt").stat().st_mtime_ns for b in BACKBONES.split(",")}
    assert pipeline.cli(args(images, run)) == 0
    after = mtimes(run / "data") | mtimes(run / "eval") | {
        f"models/{b}/model.pt": (run / "models" / b / "model.pt").stat().st_mtime_ns for b in BACKBONES.split(",")}
    assert after == before  # nothing was prepared, trained or evaluated again

    # jobs.compare of this run against a copy whose resnet50 lost 0.2 of test mAP@5 (L): the gate fails on it alone
    from jobs import compare

    worse = tmp_path / "worse"
    (worse / "eval").mkdir(parents=True)
    metrics["models"]["resnet50"]["L"]["map@5"] -= 0.2
    (worse / "eval" / "metrics.json").write_text(json.dumps(metrics))
    assert compare.cli([str(run), str(worse), "--out-dir", str(tmp_path / "cmp"), "--fail-on-drop", "0.05"]) == 1
    printed = capsys.readouterr()
    assert "## stacked" in printed.out and "| mAP@5 L |" in printed.out
    gate = printed.err.strip().splitlines()[-1]
    assert gate.startswith("jobs.compare: 1 drop(s) beyond the gate: resnet50 mAP@5 L fell"), gate
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert compare.cli([str(run), str(run), "--out-dir", str(tmp_path / "cmp"), "--fail-on-drop", "0"]) == 0


def test_a_run_interrupted_after_training_resumes_at_evaluation(images, tmp_path):
    run = tmp_path / "run"
    cfg = pipeline.PipelineConfig(source=f"imagefolder:{images}", run_dir=str(run), preset="smoke",
                                  backbones=("resnet50",), include_untrained=False)
    stages.prepare_stage(cfg)  # what a run that died during evaluation left behind
    stages.train_stage(cfg, {})
    trained = {b: (run / "models" / b / "model.pt").stat().st_mtime_ns for b in cfg.backbones}
    assert not (run / "eval" / "metrics.json").exists()

    pipeline.main(cfg)
    assert {b: (run / "models" / b / "model.pt").stat().st_mtime_ns for b in cfg.backbones} == trained
    assert (run / "eval" / "metrics.json").is_file()


def test_pipeline_tune_trains_each_backbone_with_its_best_json_and_honours_storage(images, tmp_path):
    run, storage = tmp_path / "run", tmp_path / "storage"
    code = pipeline.cli(args(images, run, "--tune", "--no-include-untrained", "--epochs", "2",
                             "--storage", str(storage), backbones="resnet50"))
    assert code == 0
    best = json.loads((run / "tune" / "resnet50" / "best.json").read_text())
    config = json.loads((run / "models" / "resnet50" / "config.json").read_text())
    assert (config["margin"], config["lr"]) == (best["margin"], best["lr"])  # the tuned values, not the preset's
    assert config["epochs"] == 2  # the pipeline's training override
    rows = (run / "models" / "resnet50" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [0, 1, 2]
    assert json.loads((run / "eval" / "metrics.json").read_text())["models"].keys() == {"resnet50"}
    assert set(json.loads((run / "pipeline.json").read_text())["stages_seconds"]) == {
        "prepare", "tune", "train", "evaluate"}
    # Tune's experiment, every trial's checkpoints and the training checkpoints went to --storage, not RUN
    assert (storage / "tune" / "resnet50" / "trials").is_dir()
    assert list((storage / "tune" / "resnet50" / "train").rglob("checkpoint_*"))
    assert [p.name for p in storage.glob("resnet50-*")] and not list((run / "models").rglob("checkpoint_*"))


def test_bad_source_is_one_line_and_exit_2(tmp_path, capsys):
    code = pipeline.cli(["--source", f"imagefolder:{tmp_path / 'missing'}", "--run-dir", str(tmp_path / "run"),
                         "--preset", "smoke"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("jobs.pipeline: error:")]
    assert code == 2 and len(errors) == 1 and "missing" in errors[0] and "Traceback" not in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A separate Ray head on 127.0.0.1 (with the Jobs API), stopped with its process group at the end."""
    port, dashboard = free_port(), free_port()
    # the session's own Ray also runs on this machine: every fixed default port must move
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--num-cpus=4",
         "--include-dashboard=true", f"--object-store-memory={512 * 1024 * 1024}", *ports],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    client = None
    while client is None:
        try:
            client = JobSubmissionClient(address)
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            if time.monotonic() > deadline or head.poll() is not None:
                head.kill()
                raise RuntimeError(f"Ray head did not come up: {head.stderr.read().decode()[-2000:]}") from None
            time.sleep(2)
    yield client
    os.killpg(head.pid, 15)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, 9)


def test_smoke_pipeline_as_a_ray_job(images, tmp_path, ray_head):
    from ray.job_submission import JobStatus

    run = tmp_path / "run"
    entrypoint = " ".join([sys.executable, "-m", "jobs.pipeline", *args(images, run, backbones="resnet50"),
                           "--no-include-untrained"])
    deadline = time.monotonic() + 120
    while True:  # the head's job agent starts a few seconds after its dashboard
        try:
            job = ray_head.submit_job(entrypoint=entrypoint,
                                      runtime_env={"working_dir": str(REPO),
                                                   "excludes": [".git", ".venv", ".ci-venv", "runs", "data"]})
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + 600
    while (status := ray_head.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "the Ray job did not finish in 10 minutes"
        time.sleep(3)
    logs = ray_head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "started a local Ray" not in logs  # it attached to the cluster instead
    assert json.loads((run / "eval" / "metrics.json").read_text())["models"].keys() == {"resnet50"}
