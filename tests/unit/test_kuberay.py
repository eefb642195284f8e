"""deploy/kuberay: the manifests parse and hold together with the project and cluster.yaml (the entrypoint parses
with the job's own parser, RUN under the shared mount, one image and Ray version, a CPU-only head, GPU workers from
zero). Nothing here runs a Kubernetes cluster; the field names were checked against KubeRay's v1 CRD types."""

import ast
import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from lib.config import parse_config
from lib.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
SHARED = "/mnt/shared"


def documents(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc}


@pytest.fixture
def rayjob() -> dict:
    return documents("rayjob.yaml")["RayJob"]


@pytest.fixture
def rayservice() -> dict:
    return documents("rayservice.yaml")["RayService"]


def pod_specs(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (group["groupName"], group["template"]["spec"]) for group in cluster.get("workerGroupSpecs", [])]


def shared_mount(pod: dict) -> str:
    claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    (mount,) = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in claims]
    return mount


def test_the_manifests_are_kuberay_v1_objects():
    assert set(documents("rayjob.yaml")) == {"PersistentVolumeClaim", "RayJob"}
    assert set(documents("rayservice.yaml")) == {"RayService"}
    for doc in (*documents("rayjob.yaml").values(), *documents("rayservice.yaml").values()):
        assert doc["apiVersion"] in ("ray.io/v1", "v1") and doc["metadata"]["name"].startswith("cifar-embeddings")


def test_the_entrypoint_parses_with_the_pipelines_own_parser(rayjob):
    from jobs.pipeline import PipelineConfig

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    cfg = parse_config(PipelineConfig, argv[3:])
    assert cfg.preset == "full" and Path(cfg.run_dir).is_absolute()
    assert Path(cfg.run_dir).is_relative_to(SHARED)  # RUN (and DATA, RUN/data) on the claim every pod mounts
    with pytest.raises(UserError, match="unrecognized arguments: --no-such-flag"):
        parse_config(PipelineConfig, [*argv[3:], "--no-such-flag"])


def test_the_service_app_names_the_builder_and_its_arguments(rayservice):
    app, = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    module, function = app["import_path"].split(":")
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert function in {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    known = re.search(r"known = \{([^}]*)\}", source.split(f"def {function}(")[1]).group(1)
    assert set(app["args"]) <= {name.strip().strip('"') for name in known.split(",")}
    assert Path(app["args"]["run_dir"]).is_relative_to(SHARED)


def test_every_pod_mounts_the_rwx_claim_at_the_same_path(rayjob, rayservice):
    claim = documents("rayjob.yaml")["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for cluster in (rayjob["spec"]["rayClusterSpec"], rayservice["spec"]["rayClusterConfig"]):
        for name, pod in pod_specs(cluster):
            assert shared_mount(pod) == SHARED, name
            assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                    if "persistentVolumeClaim" in v} == {claim["metadata"]["name"]}


def test_one_image_and_ray_version_with_cluster_yaml_and_the_installed_ray(rayjob, rayservice):
    launcher_image = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    assert base == launcher_image
    ray_version = metadata.version("ray")
    assert base.startswith(f"rayproject/ray:{ray_version}-")
    images = set()
    for cluster in (rayjob["spec"]["rayClusterSpec"], rayservice["spec"]["rayClusterConfig"]):
        assert cluster["rayVersion"] == ray_version
        images |= {c["image"] for _, pod in pod_specs(cluster) for c in pod["containers"]}
    assert len(images) == 1  # the image built from the Dockerfile, everywhere


def test_the_dockerfile_bakes_in_the_project_with_the_cuda_12_torch_first():
    text = (KUBERAY / "Dockerfile").read_text()
    torch_line = text.index("torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128")
    assert torch_line < text.index('pip install --no-cache-dir ".[gpu]"')
    for package in ("lib", "onray", "tuning", "jobs", "benchmarks"):
        assert f"COPY --chown=ray:users {package} ./{package}" in text


def test_a_cpu_only_head_gpu_workers_from_zero_and_the_job_cleans_up(rayjob):
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in str(container["resources"])
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if "nvidia.com/gpu" in str(g["template"]["spec"])]
    assert gpu["replicas"] == 0 and gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    for _, pod in pod_specs(cluster):  # Ray Data and the DataLoaders share memory through /dev/shm
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and any(m["mountPath"] == "/dev/shm" for c in pod["containers"] for m in c["volumeMounts"])


def test_the_heads_node_types_variable_is_the_worker_groups_shape(rayjob):
    """The jobs plan from CIFAR_EMBED_NODE_TYPES on a KubeRay head (onray.plan.NODE_TYPES_VARIABLE): it must say what
    each worker group's pods have, or the plan asks the autoscaler for nodes it cannot add."""
    from lib.planning import NodeType
    from onray.plan import NODE_TYPES_VARIABLE, parse_node_types

    cluster = rayjob["spec"]["rayClusterSpec"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (value,) = [e["value"] for e in head["env"] if e["name"] == NODE_TYPES_VARIABLE]
    groups = []
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        groups.append(NodeType(group["groupName"], int(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0)),
                               group["maxReplicas"]))
    assert parse_node_types(value, NODE_TYPES_VARIABLE) == tuple(groups)


@pytest.mark.parametrize("text", ["not json", "[1]", '{"gpu": {"resources": {"GPU": 1}}}', '{"gpu": 4}'])
def test_a_malformed_node_types_variable_is_one_clear_line(text):
    from onray.plan import NODE_TYPES_VARIABLE, parse_node_types

    with pytest.raises(UserError, match=f"^{NODE_TYPES_VARIABLE} must be JSON like"):
        parse_node_types(text, NODE_TYPES_VARIABLE)
