"""cluster.yaml passes Ray's own cluster-launcher validation and installs this project with the GPU extra."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture
def cluster_config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster_config)))  # raises on a schema error


def test_cluster_has_cpu_head_autoscaling_gpu_workers_and_installs_the_project(cluster_config):
    nodes = cluster_config["available_node_types"]
    head = nodes[cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [spec for name, spec in nodes.items() if spec["resources"].get("GPU", 0) > 0]
    assert gpu_workers and all(spec["min_workers"] == 0 < spec["max_workers"] for spec in gpu_workers)
    assert any('pip install -e "/home/ray/cifar-embeddings[gpu]"' in cmd for cmd in cluster_config["setup_commands"])
    assert "/home/ray/cifar-embeddings" in cluster_config["file_mounts"]


def test_a_broken_cluster_yaml_is_rejected(cluster_config):
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(ValidationError, match="many"):
        validate_config(prepare_config(broken))
