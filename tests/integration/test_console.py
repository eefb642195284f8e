"""What a job shows and opens: a bad image is a short console (the error last), a local Ray listens on loopback
only, and the trainers' positions reach the driver's progress bars."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, make_image_folder

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def run_job(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_corrupt_image_is_three_lines_at_most_with_the_error_last(tmp_path):
    folder = make_image_folder(tmp_path / "images", train_per_class=6, test_per_class=2)
    (folder / "train" / "cat" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    data = tmp_path / "data"
    done = run_job("jobs.prepare", "--source", f"imagefolder:{folder}", "--data-dir", str(data))
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) <= 3, done.stderr
    assert lines[-1].startswith("jobs.prepare: error: cannot read image") and "corrupt.png" in lines[-1]
    assert not any("INFO" in line or "WARNING" in line or "core_worker" in line for line in lines), done.stderr
    assert not data.exists()
    # Ray's own lines went to the job's log file, which the console named
    named = [line.split("log file: ", 1)[1].split(" ")[0] for line in lines if "log file: " in line]
    assert named, done.stderr
    log_text = Path(named[0]).read_text(encoding="utf-8")
    assert "Started a local Ray instance" in log_text and "jobs.prepare: error" in log_text


def test_a_local_ray_listens_on_loopback_only(tmp_path):
    """Start Ray the jobs' way (dashboard included) in a fresh process, run a task and an actor, and list every
    listening socket of that Ray's processes."""
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from onray.runtime import init_ray
        init_ray(num_cpus=2)
        import ray, psutil

        @ray.remote
        class Echo:
            def ping(self):
                return os.getpid()

        @ray.remote
        def pid():
            return os.getpid()

        pids = {{os.getpid(), ray.get(pid.remote()), ray.get(Echo.remote().ping.remote())}}
        from onray.ray_internals import session_dir
        session = session_dir()
        for proc in psutil.process_iter():
            try:
                if any(session in arg for arg in proc.cmdline()):
                    pids.add(proc.pid)
            except psutil.Error:
                pass
        for parent in list(pids):
            try:
                pids |= {{child.pid for child in psutil.Process(parent).children(recursive=True)}}
            except psutil.Error:
                pass
        listening = []
        for p in pids:
            try:
                proc = psutil.Process(p)
                listening += [[proc.name(), c.laddr.ip, c.laddr.port] for c in proc.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                pass
        print(json.dumps({{"nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "listening": listening}}))
        ray.shutdown()
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["nodes"] == ["127.0.0.1"]
    names = {name for name, _, _ in found["listening"]}
    assert {"gcs_server", "raylet"} <= names, found  # the check saw Ray's servers at all
    exposed = [entry for entry in found["listening"] if entry[1] not in LOOPBACK]
    assert not exposed, exposed


@pytest.mark.usefixtures("ray_session")
def test_trainer_positions_reach_the_drivers_bars():
    import ray

    from onray.progress import StepReporter, TrainingBars

    @ray.remote(num_cpus=0)
    def trainer(board, name: str, epochs: int, steps: int) -> None:
        reporter = StepReporter(board, name, epochs, steps, images_per_step=8)
        for epoch in range(1, epochs + 1):
            for step in range(steps + 1):
                reporter.step(epoch, step, force=step == steps)

    bars = TrainingBars(["resnet50", "vgg16"])
    ray.get([trainer.remote(bars.board, "resnet50", 2, 5), trainer.remote(bars.board, "vgg16", 3, 4)])
    final = {"resnet50": 2 * 5 * 8, "vgg16": 3 * 4 * 8}
    deadline = time.monotonic() + 30  # reports are sent without waiting: the board may still be taking the last
    while time.monotonic() < deadline and {name: bar.done for name, bar in bars.bars.items()} != final:
        bars.poll()
        time.sleep(0.1)
    assert bars.bars["resnet50"].done == bars.bars["resnet50"].total == 2 * 5 * 8
    assert bars.bars["vgg16"].done == 3 * 4 * 8 and bars.bars["vgg16"].desc == "vgg16 epoch 3/3"
    bars.close()
    assert not bars.bars
