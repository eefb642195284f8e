"""A disk that fills up while jobs.train runs: one line and exit 2, no checkpoint that looks complete but is not,
and once there is room again the same command resumes from the newest complete checkpoint.

The disk is real: a tmpfs of its own, mounted in a private mount namespace (``unshare --mount``), so the job,
its Ray and nothing else on the machine see it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from jobs import prepare
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("ray_session")

# densenet121 with the smoke preset's 32-d head: a checkpoint is 84.7 MB (model.pt 28.5 MB, AdamW's two moments in
# train_state.pt 56.2 MB). 150 MiB holds the first one and not the second, which is written beside it.
SMALL_DISK_MB, ROOMY_DISK_MB = 150, 600

IN_NAMESPACE = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    repo, disk, data, report = sys.argv[1:5]
    sys.path.insert(0, repo)
    from lib.checkpoints import checkpoint_problem

    def mount(options):
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", disk], check=True)

    def train(log):
        command = [sys.executable, "-m", "jobs.train", "--data-dir", data, "--run-dir", f"{disk}/run",
                   "--preset", "smoke", "--backbones", "densenet121", "--epochs", "2"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with open(log, "w") as out:
            code = subprocess.run(command, cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        models = Path(disk) / "run" / "models" / "densenet121"
        folders = sorted(p for p in models.glob("densenet121-*/*") if p.is_dir())
        metrics = models / "metrics.jsonl"
        return {"code": code, "output": Path(log).read_text(),
                "folders": [[p.name, checkpoint_problem(p)] for p in folders],
                "epochs": [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []}

    mount(f"size={os.environ['SMALL_DISK_MB']}m")
    found = {"full": train(f"{report}.full.log")}
    mount_options = f"remount,size={os.environ['ROOMY_DISK_MB']}m"
    subprocess.run(["mount", "-o", mount_options, disk], check=True)
    found["roomy"] = train(f"{report}.roomy.log")
    Path(report).write_text(json.dumps(found))
""")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import make_image_folder

    root = tmp_path_factory.mktemp("full_disk")
    folder = make_image_folder(root / "images", train_per_class=20, test_per_class=4)
    return prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(root / "data")))


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("mount") is None, reason="needs unshare, mount")
def test_a_full_disk_is_one_line_leaves_only_complete_checkpoints_and_the_rerun_resumes(data_dir, tmp_path):
    disk, script, report = tmp_path / "disk", tmp_path / "in_namespace.py", tmp_path / "report.json"
    disk.mkdir()
    script.write_text(IN_NAMESPACE)
    env = {"SMALL_DISK_MB": str(SMALL_DISK_MB), "ROOMY_DISK_MB": str(ROOMY_DISK_MB)}
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "env", *(f"{k}={v}" for k, v in env.items()),
                           sys.executable, str(script), str(REPO), str(disk), str(data_dir), str(report)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and not report.exists() and "mount" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(report.read_text())

    full = found["full"]
    lines = [line for line in full["output"].splitlines() if line.strip()]
    assert full["code"] == 2, full["output"][-3000:]
    assert lines[-1].startswith("jobs.train: error: No space left on device writing "), lines[-1]
    assert "/run/models/densenet121/densenet121-" in lines[-1] and "/checkpoint_" in lines[-1], lines[-1]
    assert "free some space" in lines[-1]
    assert not [line for line in lines if "ERROR" in line or "Traceback" in line], full["output"][-3000:]
    # epoch 1's checkpoint, complete; nothing of epoch 2's (no half-written folder, no temporary one)
    checkpoints = [(name, problem) for name, problem in full["folders"] if name.startswith("checkpoint_")]
    assert len(checkpoints) == 1 and checkpoints[0][1] is None, full["folders"]
    assert not [name for name, _ in full["folders"] if name.startswith(".partial-")], full["folders"]

    roomy = found["roomy"]
    assert roomy["code"] == 0, roomy["output"][-3000:]
    assert "resuming after epoch 1 from " in roomy["output"] and checkpoints[0][0] in roomy["output"]
    assert [row["epoch"] for row in roomy["epochs"]] == [0, 1, 2] and roomy["epochs"][2]["resumed_from"] == 1
