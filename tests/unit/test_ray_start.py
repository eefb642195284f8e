"""A local Ray that fails to start is started again in a fresh folder; after the last attempt, one line and
exit 3 (environment), distinct from bad input's 2. The failures are injected into ray.init."""

import shutil
from dataclasses import dataclass

import pytest
import ray

from jobs.cli import run_job
from lib.config import option
from onray import runtime


@pytest.fixture
def starts(monkeypatch):
    """ray.init that fails the first ``failures`` times; records each call's temp dir."""
    calls = []

    def fake_init(failures):
        def init(**kwargs):
            calls.append(kwargs.get("_temp_dir"))
            if len(calls) <= failures:
                raise Exception("The current node timed out during startup. This could happen because some of the "
                                "Ray processes failed to startup.")
        return init

    monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    yield lambda failures: (monkeypatch.setattr(ray, "init", fake_init(failures)), calls)[1]
    for folder in filter(None, calls):  # the fresh folders the retries made
        shutil.rmtree(folder, ignore_errors=True)


def test_a_failed_start_is_retried_in_a_fresh_folder(starts, capsys):
    calls = starts(1)
    runtime.start_local_ray(4)
    assert len(calls) == 2 and calls[0] is None and calls[1] and "ray-" in calls[1]
    err = capsys.readouterr().err
    assert "starting a local Ray failed (Exception: The current node timed out" in err and "attempt 2 of 3" in err


def test_after_the_last_attempt_one_line_and_exit_3(starts, capsys):
    @dataclass(frozen=True)
    class Config:
        name: str = option("x", help="unused")

    calls = starts(5)
    code = run_job(lambda cfg: runtime.start_local_ray(4), Config, [], prog="jobs.x")
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert code == 3 and len(calls) == runtime.START_ATTEMPTS and len(set(calls[1:])) == len(calls) - 1
    assert len(lines) == 1 and lines[0].startswith("jobs.x: environment error: could not start a local Ray in 3")
    assert "session_latest/logs" in lines[0] and "ray start --head" in lines[0] and "RAY_ADDRESS" in lines[0]
