"""Every numeric setting is range-checked when the config is built (one line, exit 2, before any work), and a
full or read-only disk is one line and exit 2 as well."""

import errno
import json

import pytest

from jobs import evaluate, pipeline, prepare, train, tune
from jobs.cli import run_job
from lib.config import option
from lib.errors import disk_error, failure_reason
from lib.io import write_json


def one_error_line(capsys, prog):
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


@pytest.mark.parametrize(("flag", "value"), [
    ("--patience", "-1"), ("--train-per-class", "-1"), ("--val-per-class", "-2"), ("--max-failures", "-1"),
    ("--margin", "-0.1"), ("--margin", "0"), ("--weight-decay", "-1"), ("--warmup-epochs", "-0.5"),
    ("--seed", "-1"), ("--epochs", "0"), ("--lr", "0"),
])
def test_train_rejects_out_of_range_settings(tmp_path, capsys, flag, value):
    code = train.cli(["--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), flag, value])
    line = one_error_line(capsys, "jobs.train")
    assert code == 2 and f"{flag} must be" in line and value in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("job", "prog", "base", "flag", "value"), [
    (prepare, "jobs.prepare", ["--source", "imagefolder:/nowhere"], "--seed", "-1"),
    (evaluate, "jobs.evaluate", ["--data-dir", "d"], "--csv-rows", "-1"),
    (evaluate, "jobs.evaluate", ["--data-dir", "d"], "--num-actors", "-1"),
    (tune, "jobs.tune", ["--data-dir", "d"], "--max-failures", "-1"),
    (tune, "jobs.tune", ["--data-dir", "d"], "--train-per-class", "-5"),
    (pipeline, "jobs.pipeline", ["--source", "imagefolder:/nowhere"], "--seed", "-3"),
    (pipeline, "jobs.pipeline", ["--source", "imagefolder:/nowhere"], "--epochs", "0"),
    (pipeline, "jobs.pipeline", ["--source", "imagefolder:/nowhere"], "--val-fraction", "1.5"),
])
def test_every_job_rejects_out_of_range_settings(tmp_path, capsys, job, prog, base, flag, value):
    out = ["--data-dir", str(tmp_path / "out")] if job is prepare else ["--run-dir", str(tmp_path / "out")]
    code = job.cli([*base, *out, flag, value])
    line = one_error_line(capsys, prog)
    assert code == 2 and flag.lstrip("-") in line
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_line_exit_2_and_leaves_the_old_file_whole(tmp_path, capsys, monkeypatch):
    from dataclasses import dataclass

    target = tmp_path / "result.json"
    write_json(target, {"old": True})

    @dataclass(frozen=True)
    class Config:
        out: str = option(help="a file")

    def full_disk(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device", str(destination))

    monkeypatch.setattr("os.replace", full_disk)
    code = run_job(lambda cfg: write_json(cfg.out, {"new": True}), Config, ["--out", str(target)], prog="jobs.x")
    line = one_error_line(capsys, "jobs.x")
    assert code == 2 and "No space left on device writing" in line and "free some space" in line
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left behind


def test_other_os_errors_are_not_disguised_as_bad_input():
    assert disk_error(OSError(errno.ENOENT, "No such file or directory")) is None
    wrapped = RuntimeError("worker died")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system", "/runs/x/model.pt")
    assert "Read-only file system writing /runs/x/model.pt" in str(disk_error(wrapped))


def test_a_failure_is_named_by_its_innermost_cause():
    inner = RuntimeError("step 3\nRuntimeError: injected failure at epoch 3 (--inject-failure)")
    outer = Exception("Training failed due to worker errors:")
    outer.__cause__ = inner
    assert failure_reason(outer) == "RuntimeError: RuntimeError: injected failure at epoch 3 (--inject-failure)"
