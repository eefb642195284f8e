"""What the running cluster has and can add, for the resource plans: the nodes that are up and the node types its
autoscaler can bring up, the requests for what a plan places (asked for and waited on), whether a GPU node's torch
can use its GPU, and the embedding actor pool.

The plans themselves are pure functions of that shape, in :mod:`lib.planning`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lib.console import log
from lib.devices import available_cpus, resolve_use_gpu
from lib.errors import UserError
from lib.planning import (
    ActorPlan,
    ClusterShape,
    NodeType,
    launcher_node_types,
    node_of_type,
    plan_actors,
    plan_gpu_actors,
)

# How long a job waits for the autoscaler to bring up the GPU nodes it asked for (cloud GPU nodes take minutes).
GPU_WAIT_S = 15 * 60
# The cluster launcher's config on the head node, where `ray job submit` runs the job's driver.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
# The node types a KubeRay cluster's autoscaler can add, set by the manifest (deploy/kuberay/rayjob.yaml): JSON in
# the shape of cluster.yaml's available_node_types, {"gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4}}.
NODE_TYPES_VARIABLE = "CIFAR_EMBED_NODE_TYPES"
# A node group without a limit (max_count -1 in a published cluster config) counts as this many nodes.
UNLIMITED_NODES = 64


def cluster_cpus_gpus() -> tuple[int, int]:
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("CPU", 1)), int(resources.get("GPU", 0))


def parse_node_types(text: str, where: str) -> tuple[NodeType, ...]:
    """The node types of :data:`NODE_TYPES_VARIABLE`'s JSON; anything else is one :class:`UserError` naming ``where``."""
    example = '{"gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4}}'
    try:
        value = json.loads(text)
        if not isinstance(value, dict) or not all(isinstance(spec, dict) and isinstance(spec.get("resources"), dict)
                                                  and isinstance(spec.get("max_workers"), int)
                                                  for spec in value.values()):
            raise ValueError
        types, _ = launcher_node_types({"available_node_types": value})
    except (ValueError, TypeError):
        raise UserError(f"{where} must be JSON like {example} (each node type's resources and max_workers), "
                        f"got {text[:200]!r}") from None
    return types


def autoscaler_node_types() -> tuple[tuple[NodeType, ...], int | None, str]:
    """The worker node types the cluster's autoscaler can add, its cap on worker nodes in all, and where they were
    read: :data:`NODE_TYPES_VARIABLE` when set (KubeRay), else the cluster config Ray publishes (a platform's
    autoscaler), else the launcher's config on the head (``ray up``). Nothing on a local Ray (no autoscaler)."""
    from onray.ray_internals import cluster_config_node_groups
    from onray.runtime import on_cluster

    if not on_cluster():
        return (), None, ""
    if os.environ.get(NODE_TYPES_VARIABLE, "").strip():
        return parse_node_types(os.environ[NODE_TYPES_VARIABLE], NODE_TYPES_VARIABLE), None, NODE_TYPES_VARIABLE
    groups = [g for g in cluster_config_node_groups() if g["max_count"] != 0]
    if groups:
        return tuple(NodeType(g["name"], int(g["resources"].get("CPU", 0)), int(g["resources"].get("GPU", 0)),
                              UNLIMITED_NODES if g["max_count"] < 0 else g["max_count"]) for g in groups), None, \
            "the cluster config Ray publishes"
    try:
        import yaml

        config = yaml.safe_load(BOOTSTRAP_CONFIG.expanduser().read_text()) or {}
        types, limit = launcher_node_types(config)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return (), None, ""
    return types, limit, str(BOOTSTRAP_CONFIG)


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def cluster_shape(use_gpu: str = "auto", wanted_gpus: int = 1) -> ClusterShape:
    """The running cluster's :class:`lib.planning.ClusterShape`: its alive nodes (each named after the node type of
    its shape) and the node types its autoscaler can add (:func:`autoscaler_node_types`). On a cluster whose
    autoscaler's node types are unknown and that has no GPU, ``--use-gpu true`` counts on ``wanted_gpus`` one-GPU
    nodes (:func:`ensure_resources` then waits and says so if none come)."""
    from onray.runtime import on_cluster

    types, limit, source = autoscaler_node_types()
    nodes = tuple(node_of_type(int(node["Resources"].get("CPU", 0)), int(node["Resources"].get("GPU", 0)), types,
                               head="node:__internal_head__" in node["Resources"]) for node in alive_nodes())
    if (not types and str(use_gpu) == "true" and on_cluster() and not any(node.gpus for node in nodes)):
        types, source = (NodeType("GPU", 1, 1, wanted_gpus),), "--use-gpu true (the autoscaler's limits are unknown)"
    return ClusterShape(nodes, types, limit, source)


def ensure_resources(bundles: list[dict[str, float]], gpus: int, timeout_s: float = GPU_WAIT_S,
                     poll_s: float = 2.0) -> int:
    """Ask the autoscaler for ``bundles`` (the plan's shapes: one per node a group of workers shares) and wait until
    the cluster has ``gpus`` GPUs; returns the GPUs it has.

    Logs while it waits; after ``timeout_s`` the request is withdrawn and a :class:`UserError` says so.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    have = cluster_cpus_gpus()[1]
    if have >= gpus:
        return have
    request_resources(bundles=bundles)
    started = last_log = time.monotonic()
    shapes = ", ".join(f"{count} x {shape}" for shape, count in _counted(bundles))
    log(f"waiting for {gpus} GPU(s): the cluster has {have} and its autoscaler is asked for {shapes} "
        f"(giving up after {timeout_s / 60:.0f} min)")
    try:
        while (have := int(ray.cluster_resources().get("GPU", 0))) < gpus:
            if time.monotonic() - started > timeout_s:
                raise UserError(f"the cluster did not bring up {gpus} GPU(s) in {timeout_s / 60:.0f} min (it has "
                                f"{have}): check the autoscaler (ray status, the cluster's GPU quota), or use "
                                f"--use-gpu false")
            if time.monotonic() - last_log > 60:
                last_log = time.monotonic()
                log(f"still waiting for GPUs: {have}/{gpus} after {(last_log - started) / 60:.0f} min")
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])  # the trainers' and actors' own requests keep the nodes from here on
    log(f"{have} GPU(s) up after {time.monotonic() - started:.0f} s")
    return have


def _counted(bundles: list[dict[str, float]]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for bundle in bundles:
        shape = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items(), reverse=True)) + "}"
        counts[shape] = counts.get(shape, 0) + 1
    return list(counts.items())


def _cuda_problem() -> str | None:
    import torch

    from lib.devices import cuda_unusable_reason

    return None if torch.cuda.is_available() else cuda_unusable_reason()


def check_cuda_on_a_gpu_node(timeout_s: float = 300) -> None:
    """Run a one-GPU probe task: a GPU node whose torch cannot use its GPU (a CUDA build the driver does not
    support) is one clear line now, not a worker-group crash retried by the failure policy, nor a silent CPU run."""
    import ray

    probe = ray.remote(num_cpus=0, num_gpus=1, max_retries=0)(_cuda_problem)
    problem = ray.get(probe.remote(), timeout=timeout_s)
    if problem:
        raise UserError(problem)


def plan_actor_pool(use_gpu: str, num_actors: int = 0) -> tuple[ActorPlan, ClusterShape]:
    """The embedding actor pool on the running cluster, without asking for anything: one actor per GPU the cluster
    has or can add (:func:`lib.planning.plan_gpu_actors`), else :func:`lib.planning.cpu_actors_per_node` per node."""
    import ray

    shape = cluster_shape(use_gpu, num_actors or 1)
    on_gpu = resolve_use_gpu(use_gpu, sum(node.gpus for node in shape.reachable()), "the Ray cluster")
    if on_gpu:
        return plan_gpu_actors(shape, num_actors), shape
    here = ray.util.get_node_ip_address()
    nodes = [node for node in alive_nodes() if node["Resources"].get("CPU", 0) >= 1]
    # nodes at this driver's address share its machine's cores (a simulated cluster's nodes all do)
    local = sum(node["NodeManagerAddress"] == here for node in nodes)
    cores = max(1, available_cpus() // max(1, local))
    cpu_nodes = [(int(node["Resources"]["CPU"]), cores if node["NodeManagerAddress"] == here else None)
                 for node in nodes]
    return plan_actors(False, 0, cpu_nodes, num_actors), shape


def actor_plan(use_gpu: str, num_actors: int = 0) -> ActorPlan:
    """:func:`plan_actor_pool`, then the GPU nodes it places actors on asked of the autoscaler and waited for, and a
    GPU probed."""
    plan, shape = plan_actor_pool(use_gpu, num_actors)
    if plan.on_gpu:
        ensure_resources(plan.bundles(), plan.actors)
        check_cuda_on_a_gpu_node()
    return plan
