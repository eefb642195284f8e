"""Two jobs started at once on one machine, each with a local Ray of its own, both finish (no cross-talk)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import prepare
from tests.conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("ray_session")
REPO = Path(__file__).resolve().parents[2]


def test_two_smoke_trainings_at_once_both_finish(tmp_path):
    folder = make_image_folder(tmp_path / "images", train_per_class=16, test_per_class=4)
    data = prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(tmp_path / "data")))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # each starts its own local Ray, as two terminals would
    jobs = [subprocess.Popen([sys.executable, "-m", "jobs.train", "--data-dir", str(data), "--run-dir",
                              str(tmp_path / f"run{i}"), "--preset", "smoke", "--backbones", "resnet50",
                              "--epochs", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, output in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, output[-3000:]
        assert "multiple active Ray instances" not in output
    for i in range(2):
        assert (tmp_path / f"run{i}" / "models" / "resnet50" / "summary.json").is_file()
