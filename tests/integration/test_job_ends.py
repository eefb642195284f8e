"""A local Ray started by a job dies with the job however the job ends: SIGKILL leaves no Ray process behind
(the raylet's agents included), and SIGTERM (what `ray job stop` sends) ends it like Ctrl-C, with one line."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from jobs import prepare
from tests.conftest import REPO, make_image_folder

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ends")
    folder = make_image_folder(root / "images", train_per_class=24, test_per_class=4)
    return prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(root / "data")))


def start_training(data_dir, run_dir):
    """jobs.train from the command line with its own local Ray, long enough to be stopped mid-run; returns it once
    its Ray runs workers, with the processes under it then."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, "-m", "jobs.train", "--data-dir", str(data_dir), "--run-dir", str(run_dir),
                            "--preset", "smoke", "--backbones", "resnet50", "--epochs", "200"],
                           cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        tree = psutil.Process(job.pid).children(recursive=True)
        names = {process.name() for process in tree if process.is_running()}
        if {"raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names and any(
                name.startswith("ray::") and "Agent" not in name and name != "ray::IDLE" for name in names):
            return job, tree
        assert job.poll() is None, job.stderr.read()
        time.sleep(1)
    job.kill()
    raise AssertionError("the job's Ray did not start workers in 240 s")


def left_running(tree, within_s):
    """The processes of ``tree`` still running after up to ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        alive = []
        for process in tree:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{process.pid} {process.name()}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1)


def end_all(tree):
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def test_a_sigkilled_job_leaves_no_ray_process(data_dir, tmp_path):
    job, tree = start_training(data_dir, tmp_path / "run")
    try:
        job.kill()
        job.wait(timeout=30)
        assert left_running(tree, within_s=30) == []
    finally:
        end_all(tree)


def test_sigterm_ends_the_job_like_ctrl_c_with_one_line_and_its_ray_with_it(data_dir, tmp_path):
    job, tree = start_training(data_dir, tmp_path / "run")
    try:
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=120)
        assert job.returncode == 130, err
        assert "jobs.train: interrupted" in err.splitlines(), err
        assert "SIGTERM received" not in err and "logging.cc" not in err, err  # Ray's C++ signal dump
        assert left_running(tree, within_s=30) == []
    finally:
        end_all(tree)
