"""A run folder is data: a crafted checkpoint stops jobs.train with one line in the driver and runs nothing;
the real checkpoint still resumes."""

import json
import os
import re
import shutil

import pytest
import torch

from jobs import prepare, train
from lib.checkpoints import MANIFEST_FILE, TRAIN_STATE_FILE, seal_checkpoint

pytestmark = pytest.mark.usefixtures("ray_session")
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING) ")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import make_image_folder

    root = tmp_path_factory.mktemp("untrusted")
    folder = make_image_folder(root / "images", train_per_class=24, test_per_class=4)
    return prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(root / "data")))


def test_a_crafted_checkpoint_fails_the_rerun_with_one_line_and_runs_nothing(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--data-dir", str(data_dir), "--run-dir", str(run), "--preset", "smoke", "--backbones", "resnet50",
             "--epochs", "2", "--max-failures", "0"]
    # epoch 1 trains and checkpoints, epoch 2 fails on purpose: an interrupted run that a rerun resumes
    assert train.cli([*flags, "--inject-failure", "resnet50:2"]) == 1
    capsys.readouterr()
    checkpoints = sorted(p for p in (run / "models" / "resnet50").glob("resnet50-*/checkpoint_*") if p.is_dir())
    assert checkpoints, list((run / "models" / "resnet50").rglob("*"))
    marker = tmp_path / "ran"
    real = {checkpoint: {name: (checkpoint / name).read_bytes() for name in (TRAIN_STATE_FILE, MANIFEST_FILE)}
            for checkpoint in checkpoints}
    for checkpoint in checkpoints:
        torch.save({"optimizer": _RunsCode(marker), "scheduler": {}, "history": [{"epoch": 1}]},
                   checkpoint / TRAIN_STATE_FILE)
        seal_checkpoint(checkpoint)  # whoever can write the run folder can write checkpoint.json as well

    code = train.cli(flags)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()  # progress lines and Ray's own log lines aside
             if line.strip() and not line.startswith("[") and not RAY_LOG_LINE.match(line)]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"jobs.train: error: refusing to load checkpoint file {checkpoints[-1] / TRAIN_STATE_FILE}")
    assert "delete the run's checkpoints" in lines[0] and "--run-dir" in lines[0]
    assert not marker.exists()

    # the real files back: the driver's check passes them and the workers resume from them (weights_only), in a
    # RUN moved to another folder (where the files are is not part of what the run is)
    for checkpoint, files in real.items():
        for name, data in files.items():
            (checkpoint / name).write_bytes(data)
    moved = tmp_path / "moved" / "run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    assert train.cli([str(moved) if arg == str(run) else arg for arg in flags]) == 0
    rows = [json.loads(line) for line in (moved / "models" / "resnet50" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1, 2] and rows[2]["resumed_from"] == 1
