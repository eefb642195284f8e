"""cluster.yaml passes Ray's own cluster-launcher validation, and its choices hold: one CUDA 12 stack (image
tag, torch wheel index, a setup check), the project with the GPU extra, a shared file system mounted on the
host and bound into the container (checked loudly), a CPU head and GPU workers from zero, a local-only
dashboard. The checking shell commands are run here with bash against stubs and temp folders; nothing of
this has run on a cloud."""

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
PROJECT_INSTALL = 'pip install -e "/home/ray/cifar-embeddings[gpu]"'
SHARED = "/mnt/shared"
PLACEHOLDER = "fs-REPLACE-ME"
# What .rayignore excludes (added separately); the rsync excludes must cover the same.
RAYIGNORE_PATTERNS = ["data/", "runs/", ".venv/", ".ci-venv/", ".git/", "*.parquet", "*.pt"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("mountpoint") is None,
                                reason="needs bash and util-linux mountpoint")


@pytest.fixture
def cluster_config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def all_commands(config) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key) or []]


def the_command(commands: list[str], *needles: str) -> str:
    found = [cmd for cmd in commands if all(needle in cmd for needle in needles)]
    assert len(found) == 1, f"expected one command containing {needles}, found {found}"
    return found[0]


def index_of(commands: list[str], *needles: str) -> int:
    return commands.index(the_command(commands, *needles))


def run_bash(script: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # Ray runs each command as `bash --login -c -i '... && (CMD)'`: the subshell's status is the command's.
    return subprocess.run(["bash", "-c", f"({script})"], capture_output=True, text=True, timeout=20,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def test_cluster_yaml_passes_ray_validation(cluster_config):
    from onray.ray_internals import validate_cluster_config

    validate_cluster_config(copy.deepcopy(cluster_config))  # raises on a schema error


def test_a_broken_cluster_yaml_is_rejected(cluster_config):
    from jsonschema.exceptions import ValidationError

    from onray.ray_internals import validate_cluster_config

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(ValidationError, match="many"):
        validate_cluster_config(broken)


def test_cpu_head_and_gpu_workers_that_scale_from_zero(cluster_config):
    nodes = cluster_config["available_node_types"]
    head = nodes[cluster_config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] >= 2
    assert head["max_workers"] == 0
    gpu_workers = {name: spec for name, spec in nodes.items() if spec["resources"].get("GPU", 0) > 0}
    assert gpu_workers
    for spec in gpu_workers.values():
        assert spec["min_workers"] == 0 < spec["max_workers"] <= cluster_config["max_workers"]
    assert 0 < cluster_config["idle_timeout_minutes"] <= 60
    assert "/home/ray/cifar-embeddings" in cluster_config["file_mounts"]


DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"


def test_every_node_boots_a_current_driver_image_that_rays_launcher_keeps(cluster_config):
    """Without an ImageId (or with "latest_dlami") Ray's AWS launcher substitutes its built-in 2023 Ubuntu 18.04
    DLAMI, whose driver is older than 570 (ray/autoscaler/_private/aws/config.py, _check_ami; that module needs
    boto3, which the project does not install). Every node type names the current DLAMI through EC2's
    launch-time SSM resolution instead, which the launcher passes on unchanged."""
    for name, spec in cluster_config["available_node_types"].items():
        image = spec["node_config"].get("ImageId", "")
        assert image == f"resolve:ssm:{DLAMI_PARAMETER}", name
        assert image.lower() not in ("", "latest_dlami")
    assert DLAMI_PARAMETER in CLUSTER_YAML.read_text().split("cluster_name:")[0]  # how to pin it is documented


def test_one_cuda_12_stack_torch_from_the_matching_index_before_the_project(cluster_config):
    image = cluster_config["docker"]["image"]
    tag = image.rsplit(":", 1)[1]
    assert re.search(r"-cu12\d+$", tag), f"image tag {tag!r} does not name a CUDA 12 build"
    assert not any(key in cluster_config["docker"] for key in ("head_image", "worker_image"))
    setup = cluster_config["setup_commands"]
    torch_cmd = the_command(setup, "pip install", "torch==", "--index-url")
    index = re.search(r"--index-url\s+https://download\.pytorch\.org/whl/(cu12\d+)\b", torch_cmd)
    assert index, torch_cmd
    assert index.group(1) == re.search(r"-(cu12\d+)$", tag).group(1), "image CUDA and wheel index CUDA differ"
    assert index_of(setup, "--index-url") < index_of(setup, PROJECT_INSTALL)

    # The pinned versions satisfy the project's bounds, so installing the project keeps these local builds.
    deps = {Requirement(dep).name: Requirement(dep).specifier
            for dep in pyproject()["project"]["dependencies"]}
    for name in ("torch", "torchvision"):
        pinned = re.search(rf"\b{name}==(\S+)", torch_cmd).group(1)
        assert deps[name].contains(f"{pinned}+{index.group(1)}"), (name, pinned, deps[name])


def test_every_node_installs_the_project_with_the_gpu_extra(cluster_config):
    assert PROJECT_INSTALL in cluster_config["setup_commands"]
    extras = pyproject()["project"]["optional-dependencies"]
    assert any(dep.startswith("faiss-gpu") for dep in extras["gpu"])


def _fake_torch(tmp_path: Path, cuda: str | None) -> Path:
    site = tmp_path / f"site-{cuda}"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("from . import version\n__version__ = version.__version__\n")
    (site / "torch" / "version.py").write_text(f"__version__ = '2.14.1+fake'\ncuda = {cuda!r}\n")
    (site / "torchvision").mkdir()
    (site / "torchvision" / "__init__.py").write_text("__version__ = '0.29.1+fake'\n")
    return site


@needs_bash
@pytest.mark.parametrize(("cuda", "ok"), [("12.8", True), ("13.0", False), (None, False)])
def test_the_cuda_check_after_the_install_fails_loudly_unless_torch_is_cuda_12(cluster_config, tmp_path, cuda, ok):
    setup = cluster_config["setup_commands"]
    check = the_command(setup, "torch.version.cuda")
    assert index_of(setup, PROJECT_INSTALL) < setup.index(check)
    # `python` is this interpreter, importing stand-in torch/torchvision that only carry a version.
    stub = f'python() {{ "{sys.executable}" "$@"; }}; '
    result = run_bash(stub + check, env={"PYTHONPATH": str(_fake_torch(tmp_path, cuda))})
    assert (result.returncode == 0) is ok, result
    if not ok:
        assert "not a CUDA 12 build" in result.stderr


def test_the_shared_file_system_is_mounted_on_the_host_and_bound_into_the_container(cluster_config):
    mount = the_command(cluster_config["initialization_commands"], "mount -t nfs4")
    assert f"SHARED={SHARED};" in mount
    efs_region = re.search(r"\bEFS_REGION=(\S+?);", mount).group(1)
    assert efs_region == cluster_config["provider"]["region"]
    binds = [opt.split()[1] for opt in cluster_config["docker"]["run_options"] if opt.startswith("-v ")]
    assert f"{SHARED}:{SHARED}" in binds
    # Not mounted from inside the (unprivileged) container any more.
    assert not any("mount -t" in cmd for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                   for cmd in cluster_config.get(key) or [])


def test_no_command_hides_a_failure(cluster_config):
    for cmd in all_commands(cluster_config):
        assert not re.search(r"\|\|\s*(echo|true|:)(\s|;|$)", cmd), cmd
        assert "set +e" not in cmd


HOST_STUBS = ('sudo() { echo "sudo $*" >> "$LOG"; if [ "$1" = mount ]; then return "${MOUNT_RC:-0}"; fi; }; '
              'mountpoint() { return 1; }; ')


@needs_bash
def test_the_placeholder_file_system_id_stops_the_host_setup(cluster_config, tmp_path):
    mount = the_command(cluster_config["initialization_commands"], "mount -t nfs4")
    assert f"EFS_ID={PLACEHOLDER};" in mount
    log = tmp_path / "sudo.log"
    result = run_bash(HOST_STUBS + mount, env={"LOG": str(log)})
    assert result.returncode != 0
    assert PLACEHOLDER in result.stderr
    assert not log.exists(), "nothing may be installed or mounted before the id is set"


@needs_bash
def test_a_set_file_system_id_is_mounted_and_a_failed_mount_stops_the_host_setup(cluster_config, tmp_path):
    mount = the_command(cluster_config["initialization_commands"], "mount -t nfs4")
    mount = mount.replace(f"EFS_ID={PLACEHOLDER};", "EFS_ID=fs-0123456789abcdef0;")
    log = tmp_path / "sudo.log"
    result = run_bash(HOST_STUBS + mount, env={"LOG": str(log)})
    assert result.returncode == 0, result
    calls = log.read_text()
    assert re.search(rf"sudo mount -t nfs4 -o \S+ fs-0123456789abcdef0\.efs\.us-west-2\.amazonaws\.com:/ {SHARED}\n",
                     calls), calls
    assert f"sudo chmod 1777 {SHARED}" in calls

    log.unlink()
    result = run_bash(HOST_STUBS + mount, env={"LOG": str(log), "MOUNT_RC": "32"})
    assert result.returncode != 0
    assert "could not mount" in result.stderr
    assert "chmod" not in log.read_text()


@needs_bash
@pytest.mark.parametrize(("driver", "ok"), [("535.183.01", False), ("570.86.15", True), ("580.65.06", True),
                                            (None, True)])
def test_gpu_hosts_with_a_driver_too_old_for_cuda_12_8_stop_the_host_setup(cluster_config, driver, ok):
    check = the_command(cluster_config["initialization_commands"], "nvidia-smi")
    # driver None: nvidia-smi is there but finds no GPU (the CPU head on a GPU-ready AMI).
    stub = ('nvidia-smi() { [ -n "$DRIVER_STUB" ] || return 9; '
            'if [ "$1" = -L ]; then echo "GPU 0: NVIDIA A10G"; else echo "$DRIVER_STUB"; fi; }; ')
    result = run_bash(stub + check, env={"DRIVER_STUB": driver or ""})
    assert (result.returncode == 0) is ok, result
    if not ok:
        assert "older than 570" in result.stderr


@needs_bash
def test_setup_stops_when_the_shared_folder_is_not_a_mount_point(cluster_config, tmp_path):
    setup = cluster_config["setup_commands"]
    check = the_command(setup, f"mountpoint -q {SHARED}")
    assert setup.index(check) == 0, "check the shared folder before the long installs"
    plain_folder = tmp_path / "shared"
    plain_folder.mkdir()
    result = run_bash(check.replace(SHARED, str(plain_folder)))
    assert result.returncode != 0
    assert "not a mount point" in result.stderr


@needs_bash
@pytest.mark.skipif(not (os.path.ismount("/dev/shm") and os.access("/dev/shm", os.W_OK)),
                    reason="needs a writable mount point")
def test_setup_goes_on_when_the_shared_folder_is_a_writable_mount_point(cluster_config):
    check = the_command(cluster_config["setup_commands"], f"mountpoint -q {SHARED}")
    result = run_bash(check.replace(SHARED, "/dev/shm"))
    assert result.returncode == 0, result


def test_gpu_workers_check_torch_sees_the_gpu(cluster_config):
    assert any("torch.cuda.is_available()" in cmd and "exit 1" in cmd
               for cmd in cluster_config["worker_setup_commands"])


def test_node_copies_skip_what_rayignore_skips(cluster_config):
    excludes = cluster_config["rsync_exclude"]
    assert all(pattern in excludes for pattern in RAYIGNORE_PATTERNS), excludes
    assert ".rayignore" in cluster_config["rsync_filter"]
    rayignore = ROOT / ".rayignore"
    if rayignore.exists():
        patterns = [line.strip() for line in rayignore.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        assert set(patterns) <= set(excludes), set(patterns) - set(excludes)


def test_dashboard_listens_on_the_heads_localhost_only(cluster_config):
    start = " ".join(cluster_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in start


def test_usage_comment_names_the_commands_and_the_shared_paths():
    header = "\n".join(line for line in CLUSTER_YAML.read_text().splitlines() if line.startswith("#"))
    for needle in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job submit --working-dir . --",
                   "python -m jobs.pipeline --source cifar10 --run-dir /mnt/shared/runs/r1 --preset full",
                   "ray down cluster.yaml", "ABSOLUTE paths under /mnt/shared", PLACEHOLDER):
        assert needle in header, needle
