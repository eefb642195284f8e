"""The cluster path on a simulated cluster: Ray's fake multi-node provider runs an autoscaling head, two CPU
worker nodes and GPU worker nodes (logical GPUs) that start from zero, all on this machine.

The jobs reach it the way `ray job submit` does, through RAY_ADDRESS, in subprocesses (the test session's own
Ray stays up beside it).
"""

import contextlib
import json
import os
import re
import shlex
import shutil
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
            "ray.head.default": {"resources": {"CPU": 8}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 8, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 4},
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
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=8", "--num-gpus=0",
         f"--object-store-memory={256 * 1024 * 1024}", f"--autoscaling-config={home / 'ray_bootstrap_config.yaml'}",
         *ports], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    try:
        run_on(job_env, "import ray\nray.init()\nassert ray.cluster_resources().get('GPU', 0) == 0\n", timeout=180)
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


@pytest.fixture(scope="module")
def cluster_data(fake_cluster, tmp_path_factory) -> Path:
    """A small prepared DATA, prepared through the cluster."""
    root = tmp_path_factory.mktemp("cluster-data")
    images = make_image_folder(root / "images", train_per_class=12, test_per_class=4)
    out = subprocess.run([sys.executable, "-m", "jobs.prepare", "--source", f"imagefolder:{images}", "--data-dir",
                          str(root / "data")], cwd=REPO, env=fake_cluster, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return root / "data"


def dry_run(env: dict, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "jobs.train", *args, "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


def test_dry_run_plans_every_backbone_at_once_on_one_node_each_from_the_node_types(fake_cluster, cluster_data,
                                                                                   tmp_path):
    """The CPU head and 1-GPU nodes from zero: all three backbones at once, one node each, 3 GPUs asked for (of the
    4 the group allows); 2 x 4 GPUs (CIFAR_EMBED_NODE_TYPES, as on KubeRay): each backbone's ranks on one node.
    Nothing is written into RUN and the autoscaler is asked for nothing (the next test starts from 0 GPUs)."""
    run = tmp_path / "run"
    args = ["--data-dir", str(cluster_data), "--run-dir", str(run), "--preset", "full",
            "--backbones", "densenet121,resnet50,vgg16"]
    plan = json.loads(dry_run(fake_cluster, *args, "--json").stdout)
    assert (plan["concurrent"], plan["gpus_requested"], plan["nodes_to_add"]) == (3, 3, {"gpu": 3})
    assert [(b["workers"], b["gpus_per_worker"], b["nodes"]) for b in plan["backbones"]] == [(1, 1.0, 1)] * 3
    assert plan["cluster"]["node_types_from"].endswith("ray_bootstrap_config.yaml")
    two_by_four = {**fake_cluster, "CIFAR_EMBED_NODE_TYPES": '{"gpu4": {"resources": {"CPU": 32, "GPU": 4}, '
                                                             '"max_workers": 2}}'}
    plan = json.loads(dry_run(two_by_four, *args, "--json").stdout)
    assert (plan["concurrent"], plan["gpus_requested"], plan["nodes_to_add"]) == (3, 8, {"gpu4": 2})
    assert [(b["workers"], b["nodes"]) for b in plan["backbones"]] == [(2, 1), (4, 1), (2, 1)]
    text = dry_run(fake_cluster, *args).stdout
    print(text)  # docs/cluster.md shows this output
    assert "3 of 3 backbones at once, on GPUs" in text and "3 x {GPU: 1, CPU: 1} -> 3 gpu node(s)" in text
    assert not run.exists()


def test_gpu_nodes_come_up_from_zero_in_the_plans_shapes(fake_cluster):
    log = run_on(fake_cluster, """
        import json, ray
        from lib.errors import UserError
        from lib.training import TrainConfig
        from onray.runtime import init_ray
        from onray.trainer import plan
        init_ray()
        assert ray.cluster_resources().get("GPU", 0) == 0  # the dry runs asked for nothing
        cfg = TrainConfig(data_dir="/d", run_dir="/r", backbones=("densenet121", "resnet50", "vgg16"),
                          preset="full").resolve()
        error = ""
        try:
            plan(cfg)  # asks the autoscaler for the plan's nodes, waits for them, then probes CUDA on one
        except UserError as err:  # the fake GPUs are logical: the probe finds no CUDA, and says so
            error = str(err)
        gpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        print("RESULT", json.dumps({"gpus": ray.cluster_resources().get("GPU", 0), "gpu_nodes": len(gpu_nodes),
                                    "error": error}))
    """)
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT"))[7:])
    assert (result["gpus"], result["gpu_nodes"]) == (3, 3)  # what the plan uses, not all 4 the group allows
    assert "waiting for 3 GPU(s): the cluster has 0 and its autoscaler is asked for 3 x {GPU: 1, CPU: 1}" in log
    assert result["error"].startswith("torch cannot use the GPU Ray gave this process")


def test_a_gpu_worker_without_usable_cuda_fails_with_one_clear_line(fake_cluster, cluster_data, tmp_path):
    """The fake GPUs are logical: a worker given one finds no CUDA, and says so instead of training on its CPU."""
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--data-dir", str(cluster_data), "--run-dir",
                          str(tmp_path / "run"), "--preset", "smoke", "--use-gpu", "true", "--max-failures", "0"],
                         cwd=REPO, env=fake_cluster, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    failure = [line for line in out.stderr.splitlines() if line.startswith("jobs.train: ")]
    assert len(failure) == 1 and failure[0].startswith("jobs.train: error: torch cannot use the GPU Ray gave"), failure
    assert not (tmp_path / "run" / "models" / "resnet50" / "summary.json").exists()


def test_smoke_pipeline_on_the_rayjobs_shapes_through_ray_address(fake_cluster, tmp_path):
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


def unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


def node_ports() -> list[str]:
    return [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port")]


@pytest.mark.skipif(not unshare_works(), reason="needs `unshare -m` (a mount namespace) for the node that cannot see RUN")
def test_a_node_that_does_not_see_run_is_named_in_one_line(tmp_path):
    """Two nodes, one of which has an empty file system mounted over RUN's folder (its own mount namespace): the
    node sees DATA but not RUN, like a node without the shared mount. jobs.train stops with one line naming it."""
    hidden = tmp_path / "hidden"  # the second node sees an empty tmpfs here
    hidden.mkdir()
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    common = ["--block", "--node-ip-address=127.0.0.1", f"--object-store-memory={128 * 1024 * 1024}", *node_ports()]
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--num-cpus=4", "--num-gpus=0",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={free_port()}", *common],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker_start = shlex.join([ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", "--num-gpus=0",
                               "--node-name=node-without-run", *common[:3], *node_ports()])
    worker = None
    job_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    try:
        run_on(job_env, "import ray, time\nray.init()\n", timeout=120)  # the head is up
        worker = subprocess.Popen(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {shlex.quote(str(hidden))} && "
                                                                  f"exec {worker_start}"],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        run_on(job_env, "import ray, time\nray.init()\nt = time.time()\n"
                        "while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() - t < 120:\n"
                        "    time.sleep(1)\nassert len([n for n in ray.nodes() if n['Alive']]) == 2\n", timeout=180)
        images = make_image_folder(tmp_path / "images", train_per_class=12, test_per_class=4)
        data = tmp_path / "data"
        for job in (["jobs.prepare", "--source", f"imagefolder:{images}", "--data-dir", str(data)],
                    ["jobs.train", "--data-dir", str(data), "--run-dir", str(hidden / "run"), "--preset", "smoke",
                     "--use-gpu", "false"]):
            out = subprocess.run([sys.executable, "-m", *job], cwd=REPO, env=job_env, capture_output=True, text=True,
                                 timeout=600)
        assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
        failure = [line for line in out.stderr.splitlines() if line.startswith("jobs.train: ")]
        assert len(failure) == 1, out.stderr[-3000:]
        assert re.search(r"node node-without-run at \S+ \(node id [0-9a-f]{8}\) does not see", failure[0]), failure
        assert f"does not see {hidden / 'run' / 'models'} as this driver does" in failure[0], failure
        assert not (hidden / "run" / "models" / "resnet50" / "summary.json").exists()
    finally:
        for process in (worker, head):
            if process is not None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        for pid in subprocess.run(["pgrep", "-f", f":{port}"], capture_output=True, text=True).stdout.split():
            if int(pid) != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
