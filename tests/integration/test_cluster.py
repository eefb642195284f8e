"""The cluster path on a simulated cluster: Ray's fake multi-node provider runs an autoscaling head, two CPU
worker nodes and GPU worker nodes (logical GPUs) that start from zero, all on this machine.

The jobs reach it the way `ray job submit` does, through RAY_ADDRESS, in subprocesses (the test session's own
Ray stays up beside it).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_image_folder

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_config(gcs_address: str) -> dict:
    """A cluster-launcher config for Ray's fake provider: nodes are local raylets, GPUs are logical."""
    return {
        "cluster_name": "fake", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 2, "max_workers": 2},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
        "rsync_filter": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def fake_cluster():
    """(env for a job on the cluster, home folder with the launcher config); everything is killed at the end."""
    home = Path(tempfile.mkdtemp(prefix="fake-cluster-home-"))
    port = free_port()
    config = launcher_config(f"127.0.0.1:{port}")
    # on the head of a launcher cluster the autoscaler's config is ~/ray_bootstrap_config.yaml
    (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HOME": str(home), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         f"--object-store-memory={256 * 1024 * 1024}", f"--autoscaling-config={home / 'ray_bootstrap_config.yaml'}",
         *ports], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    try:
        run_on(job_env, "import ray, time\nray.init()\nt = time.time()\n"
                        "while len([n for n in ray.nodes() if n['Alive']]) < 3 and time.time() - t < 120:\n"
                        "    time.sleep(1)\nassert len([n for n in ray.nodes() if n['Alive']]) >= 3\n", timeout=180)
        yield job_env
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        # the fake provider's nodes are raylets of their own: stop whatever still names this cluster's GCS port
        for pid in subprocess.run(["pgrep", "-f", f":{port}"], capture_output=True, text=True).stdout.split():
            if int(pid) != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


def run_on(env: dict, code: str, timeout: float = 300) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


def test_gpu_workers_come_up_from_zero_when_training_asks_for_them(fake_cluster):
    log = run_on(fake_cluster, """
        import json, ray
        from lib.training import TrainConfig
        from onray.runtime import init_ray
        from onray.trainer import plan
        init_ray()
        assert ray.cluster_resources().get("GPU", 0) == 0
        from lib.errors import UserError
        from lib.planning import plan_training
        from onray.plan import cluster_cpus_gpus, reachable_gpus
        cpus, gpus = cluster_cpus_gpus()
        cfg = TrainConfig(data_dir="/d", run_dir="/r", backbones=("resnet50", "vgg16"), preset="full").resolve()
        shape = plan_training(cfg.use_gpu, cfg.num_workers, 2, cpus, reachable_gpus(cfg.use_gpu, gpus))
        try:
            plan(cfg)  # asks the autoscaler for the GPUs, waits for them, then probes CUDA on one
        except UserError as err:  # the fake GPUs are logical: the probe finds no CUDA, and says so
            error = str(err)
        print("RESULT", json.dumps({"plan": [shape.num_workers, shape.use_gpu, shape.concurrent],
                                    "gpus": ray.cluster_resources().get("GPU", 0), "error": error}))
    """)
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT"))[7:])
    assert result["plan"] == [1, True, 2]  # --use-gpu auto on a cluster that scales to GPUs: one GPU each
    assert result["gpus"] >= 2
    assert "waiting for 2 GPU(s): the cluster has 0" in log and "GPU(s) up after" in log
    assert result["error"].startswith("torch cannot use the GPU Ray gave this process")


def test_a_gpu_worker_without_usable_cuda_fails_with_one_clear_line(fake_cluster, tmp_path):
    """The fake GPUs are logical: a worker given one finds no CUDA, and says so instead of training on its CPU."""
    images = make_image_folder(tmp_path / "images", train_per_class=12, test_per_class=4)
    data = tmp_path / "data"
    for job in (["jobs.prepare", "--source", f"imagefolder:{images}", "--data-dir", str(data)],
                ["jobs.train", "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--preset", "smoke",
                 "--use-gpu", "true", "--max-failures", "0"]):
        out = subprocess.run([sys.executable, "-m", *job], cwd=REPO, env=fake_cluster, capture_output=True, text=True,
                             timeout=600)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    failure = [line for line in out.stderr.splitlines() if line.startswith("jobs.train: ")]
    assert len(failure) == 1 and failure[0].startswith("jobs.train: error: torch cannot use the GPU Ray gave"), failure
    assert not (tmp_path / "run" / "models" / "resnet50" / "summary.json").exists()


def test_smoke_pipeline_on_three_nodes_through_ray_address(fake_cluster, tmp_path):
    images = make_image_folder(tmp_path / "images", train_per_class=16, test_per_class=6)
    run = tmp_path / "run"
    log_file = Path(os.environ.get("CLUSTER_TEST_LOG", tmp_path / "pipeline.log"))
    with open(log_file, "w") as handle:
        code = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--source", f"imagefolder:{images}",
                               "--run-dir", str(run), "--preset", "smoke", "--backbones", "resnet50",
                               "--no-include-untrained",
                               "--use-gpu", "false"],  # the fake GPUs are logical: nothing could run CUDA on them
                              cwd=REPO, env=fake_cluster, stdout=handle, stderr=subprocess.STDOUT,
                              timeout=600).returncode
    log = log_file.read_text()
    assert code == 0, log[-4000:]
    assert "started a local Ray" not in log  # it ran on the cluster
    assert json.loads((run / "eval" / "metrics.json").read_text())["models"].keys() == {"resnet50"}
    assert (run / "models" / "resnet50" / "summary.json").is_file()
    assert not list(run.rglob(".shared-storage-check-*"))  # the storage check cleans up after itself
