"""Resource plans: how many Train workers, concurrent backbones or trials, and embedding actors fit.

The ``plan_*`` functions are pure, over a cluster's CPU and GPU counts, so every cluster shape can be
tested without one; the others read the running cluster.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.console import log
from lib.devices import available_cpus, gpu_share, resolve_use_gpu
from lib.errors import UserError

# CPUs left for Ray Data's read and augmentation tasks beside each trainer's workers.
DATA_CPUS = 1
# A CPU node gets one single-threaded embedding actor per core up to this many; past it, actors share the
# node's cores as torch threads. A team of threads waits at every op for any member that one of Ray's own
# processes preempted; separate processes do not. On 2 cores, two 1-thread actors embedded 60k images faster
# than one 2-thread actor in 6 of 8 paired rounds (medians 53.2 vs 58.2 s in one run of 4; this machine drifts).
MAX_CPU_ACTORS_PER_NODE = 8
# CPUs the embedding actors leave to Ray Data's read tasks (each asks for 0.5).
READER_CPUS = 1
# How long a job waits for the autoscaler to bring up the GPU nodes it asked for (cloud GPU nodes take minutes).
GPU_WAIT_S = 15 * 60
# The cluster launcher's config on the head node, where `ray job submit` runs the job's driver.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


@dataclass(frozen=True)
class TrainPlan:
    """Workers per backbone, on GPUs or not, how many backbones (or trials) train at once and each worker's
    share of a GPU. ``workers`` lists each backbone's workers (in ``--backbones`` order) when spare GPUs
    made them differ; ``num_workers`` is then the most any backbone has."""

    num_workers: int
    use_gpu: bool
    concurrent: int
    gpus_per_worker: float = 1.0
    workers: tuple[int, ...] = ()

    def workers_of(self, backbone_index: int) -> int:
        return self.workers[backbone_index] if self.workers else self.num_workers

    def gpus_needed(self, backbones: int) -> int:
        """Whole GPUs the first :attr:`concurrent` of ``backbones`` backbones occupy at once."""
        workers = sum(self.workers_of(i) for i in range(min(self.concurrent, backbones)))
        return math.ceil(workers * self.gpus_per_worker - 1e-9) if self.use_gpu else 0


def cluster_cpus_gpus() -> tuple[int, int]:
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("CPU", 1)), int(resources.get("GPU", 0))


def launcher_max_gpus(config: dict[str, Any]) -> int:
    """GPUs a cluster-launcher config (``cluster.yaml``) can scale to: GPUs x ``max_workers`` per node type
    (the head counts once), capped by the config's ``max_workers`` worker nodes in all."""
    head = config.get("head_node_type")
    per_worker, head_gpus = [], 0
    for name, spec in (config.get("available_node_types") or {}).items():
        gpus = int((spec.get("resources") or {}).get("GPU", 0))
        if name == head:
            head_gpus = gpus
        elif gpus:
            per_worker += [gpus] * int(spec.get("max_workers", 0))
    limit = config.get("max_workers")
    per_worker.sort(reverse=True)
    return head_gpus + sum(per_worker[:limit] if limit is not None else per_worker)


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


def spread_gpus(gpus_per_node: list[int], backbones: int) -> list[int]:
    """Whole-GPU workers of each of ``backbones`` backbones when the GPUs are at least as many: each backbone goes
    to the node with the most GPUs per backbone placed there (so its DDP workers can stay on one node), and each
    node's GPUs are split between its backbones, the spare ones going to the first. Every GPU gets a worker."""
    placed: list[list[int]] = [[] for _ in gpus_per_node]
    for backbone in range(backbones):
        node = max(range(len(gpus_per_node)), key=lambda n: (gpus_per_node[n] / (len(placed[n]) + 1), -n))
        placed[node].append(backbone)
    workers = [0] * backbones
    for gpus, members in zip(gpus_per_node, placed, strict=True):
        for position, backbone in enumerate(members):
            workers[backbone] = gpus // len(members) + (position < gpus % len(members))
    return workers


def plan_training(use_gpu: str, num_workers: int | None, backbones: int, cpus: int, gpus: int,
                  gpus_per_worker: str = "auto", gpus_per_node: list[int] | None = None) -> TrainPlan:
    """GPU use, workers per backbone, each worker's GPU share and how many backbones fit at once, each with its
    workers and Ray Data's share of CPUs.

    On GPUs, ``gpus_per_worker="auto"`` and no ``num_workers``: with fewer GPUs than backbones each backbone gets
    one worker with 1/n of a GPU, n = ceil(backbones / GPUs) (GPUs / backbones, rounded down to a share that packs
    onto whole GPUs: two 2/3 shares do not fit on one), so all train at once; otherwise whole GPUs, every one used
    (:func:`spread_gpus` over ``gpus_per_node``, one node of ``gpus`` when not given). A worker of a backbone with
    several DDP workers never shares a GPU (NCCL cannot run two ranks on one device).
    """
    on_gpu = resolve_use_gpu(use_gpu, gpus, "the Ray cluster")
    if not on_gpu:
        workers = num_workers or 1
        _check_cpus(workers, cpus)
        return TrainPlan(workers, False, max(1, (cpus - DATA_CPUS) // workers))
    share = gpu_share(gpus_per_worker)
    if share is None:
        share = 1.0 / math.ceil(backbones / gpus) if num_workers is None and gpus < backbones else 1.0
    if share < 1.0 and (num_workers or 1) > 1:
        raise UserError(f"--num-workers {num_workers} with --gpus-per-worker {gpus_per_worker}: the DDP workers of one "
                        f"backbone cannot share a GPU; use --num-workers 1 or --gpus-per-worker 1")
    nodes = list(gpus_per_node) if gpus_per_node and sum(gpus_per_node) == gpus else [gpus]
    if num_workers:
        workers = [num_workers] * backbones
    elif share < 1.0 or gpus < backbones:
        workers = [1] * backbones
    else:
        workers = spread_gpus(nodes, backbones)
    slots = gpus * math.floor(1.0 / share + 1e-9)  # workers the GPUs hold at once
    most = max(workers)
    if most > slots:
        raise UserError(f"--num-workers {most} needs {math.ceil(most * share - 1e-9)} GPUs; the cluster has {gpus}")
    _check_cpus(most, cpus)
    by_gpu = backbones if sum(workers) <= slots else slots // most
    concurrent = max(1, min((cpus - DATA_CPUS) // most, by_gpu))
    same = len(set(workers)) == 1
    return TrainPlan(most, True, concurrent, share, () if same else tuple(workers))


def _check_cpus(workers: int, cpus: int) -> None:
    if workers + DATA_CPUS > cpus:
        raise UserError(f"--num-workers {workers} needs {workers + DATA_CPUS} CPUs with Ray Data's share; "
                        f"the cluster has {cpus}")


def cluster_gpus_per_node() -> list[int]:
    """GPUs of each alive node of the running cluster (nodes without GPUs left out)."""
    import ray

    return [int(node["Resources"].get("GPU", 0)) for node in ray.nodes()
            if node.get("Alive") and node["Resources"].get("GPU", 0) >= 1]


def plan_trials(workers: int, use_gpu: bool, cpus: int, gpus: int) -> int:
    """Tune trials that fit at once: each holds 1 CPU for its driver, ``workers`` CPUs (and GPUs) and Ray
    Data's share. More would leave Ray Data's read tasks unscheduled behind idle trial drivers."""
    by_cpu = cpus // (1 + workers + DATA_CPUS)
    return max(1, min(by_cpu, gpus // workers) if use_gpu else by_cpu)


def cpu_actors_per_node(node_cpus: int, cores: int | None = None) -> int:
    """CPU embedding actors for a node with ``node_cpus`` Ray CPUs and ``cores`` cores (when known: a local Ray
    advertises more logical CPUs than the machine has, see ``onray.runtime.local_num_cpus``)."""
    return max(1, min(MAX_CPU_ACTORS_PER_NODE, node_cpus, cores or node_cpus))


def plan_cpu_actors(nodes: list[tuple[int, int | None]]) -> int:
    """CPU embedding actors for nodes of (Ray CPUs, cores when known): :func:`cpu_actors_per_node` each, but
    leaving :data:`READER_CPUS` of the cluster's CPUs to the read tasks. A pool that takes every CPU starves its
    own input and waits forever (seen on a simulated three-node cluster whose autoscaler had added nodes)."""
    actors = sum(cpu_actors_per_node(cpus, cores) for cpus, cores in nodes)
    return max(1, min(actors, sum(cpus for cpus, _ in nodes) - READER_CPUS))


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


def actor_plan(use_gpu: str, num_actors: int = 0) -> dict[str, Any]:
    """``map_batches`` resources of the embedding actors on the running cluster: one actor per GPU
    (``num_gpus=1``; on a cluster that scales from zero GPUs, the autoscaler is asked for ``num_actors`` or
    one), else :func:`cpu_actors_per_node` per node."""
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
    room = max(1, sum(cpus for cpus, _ in cpu_nodes) - READER_CPUS)
    if num_actors:
        actors = num_actors
        if actors > room:
            log(f"--num-actors {actors} is more than the {room} CPU(s) this cluster has beside the read tasks; "
                f"using {room}")
            actors = room
    elif on_gpu:
        actors = min(gpus, room)
    else:
        actors = plan_cpu_actors(cpu_nodes)
    return {"compute": ray.data.ActorPoolStrategy(size=actors), "num_gpus": 1 if on_gpu else 0, "num_cpus": 1,
            "actors": actors, "actors_per_node": math.ceil(actors / max(1, len(cpu_nodes))), "on_gpu": on_gpu}
