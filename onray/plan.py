"""What the running cluster has, for the resource plans: its CPUs and GPUs, the GPUs its autoscaler can add
(asked for and waited on), whether a GPU node's torch can use its GPU, and the embedding actor pool.

The plans themselves are pure functions of those counts, in :mod:`lib.planning`.
"""

from __future__ import annotations

import time
from pathlib import Path

from lib.console import log
from lib.devices import available_cpus, resolve_use_gpu
from lib.errors import UserError
from lib.planning import ActorPlan, launcher_max_gpus, plan_actors

# How long a job waits for the autoscaler to bring up the GPU nodes it asked for (cloud GPU nodes take minutes).
GPU_WAIT_S = 15 * 60
# The cluster launcher's config on the head node, where `ray job submit` runs the job's driver.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def cluster_cpus_gpus() -> tuple[int, int]:
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("CPU", 1)), int(resources.get("GPU", 0))


def scalable_gpus() -> int:
    """GPUs the cluster's autoscaler can bring up: from the cluster config Ray publishes (autoscaler v2, the
    reading Ray Train itself makes), else from the launcher's config on the head; 0 without an autoscaler."""
    from onray.ray_internals import cluster_config_max_resources

    limits = cluster_config_max_resources()  # {} without it: the launcher's file remains
    if limits.get("GPU"):
        return int(limits["GPU"])
    try:
        import yaml

        return launcher_max_gpus(yaml.safe_load(BOOTSTRAP_CONFIG.expanduser().read_text()) or {})
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def reachable_gpus(use_gpu: str, gpus: int, wanted: int = 1) -> int:
    """GPUs a plan may count on: those the cluster has, else those its autoscaler can add. On a cluster whose
    autoscaler limits are unknown, ``--use-gpu true`` counts on ``wanted`` (:func:`ensure_gpus` then waits and
    says so if none come); a local Ray has no autoscaler."""
    from onray.runtime import on_cluster

    if gpus or str(use_gpu) == "false":
        return gpus
    scalable = scalable_gpus()
    if not scalable and str(use_gpu) == "true" and on_cluster():
        return wanted
    return scalable


def ensure_gpus(needed: int, timeout_s: float = GPU_WAIT_S, poll_s: float = 2.0) -> int:
    """Ask the autoscaler for ``needed`` GPUs and wait until the cluster has them; returns the GPUs it has.

    Logs while it waits; after ``timeout_s`` the request is withdrawn and a :class:`UserError` says so.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    have = cluster_cpus_gpus()[1]
    if have >= needed:
        return have
    request_resources(bundles=[{"GPU": 1}] * needed)
    started = last_log = time.monotonic()
    log(f"waiting for {needed} GPU(s): the cluster has {have} and its autoscaler is starting GPU nodes "
        f"(giving up after {timeout_s / 60:.0f} min)")
    try:
        while (have := int(ray.cluster_resources().get("GPU", 0))) < needed:
            if time.monotonic() - started > timeout_s:
                raise UserError(f"the cluster did not bring up {needed} GPU(s) in {timeout_s / 60:.0f} min (it has "
                                f"{have}): check the autoscaler (ray status, the cluster's GPU quota), or use "
                                f"--use-gpu false")
            if time.monotonic() - last_log > 60:
                last_log = time.monotonic()
                log(f"still waiting for GPUs: {have}/{needed} after {(last_log - started) / 60:.0f} min")
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])  # the trainers' and actors' own requests keep the nodes from here on
    log(f"{have} GPU(s) up after {time.monotonic() - started:.0f} s")
    return have


def cluster_gpus_per_node() -> list[int]:
    """GPUs of each alive node of the running cluster (nodes without GPUs left out)."""
    import ray

    return [int(node["Resources"].get("GPU", 0)) for node in ray.nodes()
            if node.get("Alive") and node["Resources"].get("GPU", 0) >= 1]


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


def actor_plan(use_gpu: str, num_actors: int = 0) -> ActorPlan:
    """The embedding actor pool on the running cluster (:func:`lib.planning.plan_actors`): one actor per GPU (on a
    cluster that scales from zero GPUs, the autoscaler is asked for ``num_actors`` or one), else
    :func:`lib.planning.cpu_actors_per_node` per node."""
    import ray

    _, gpus = cluster_cpus_gpus()
    on_gpu = resolve_use_gpu(use_gpu, reachable_gpus(use_gpu, gpus, num_actors or 1), "the Ray cluster")
    if on_gpu and gpus == 0:
        gpus = ensure_gpus(num_actors or 1)
    if on_gpu:
        check_cuda_on_a_gpu_node()
    here = ray.util.get_node_ip_address()
    cpu_nodes = [(int(node["Resources"].get("CPU", 0)), available_cpus() if node["NodeManagerAddress"] == here else None)
                 for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]
    return plan_actors(on_gpu, gpus, cpu_nodes, num_actors)
