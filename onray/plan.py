"""Resource plans: how many Train workers, concurrent backbones or trials, and embedding actors fit.

The ``plan_*`` functions are pure, over a cluster's CPU and GPU counts, so every cluster shape can be
tested without one; the others read the running cluster.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from lib.devices import resolve_use_gpu
from lib.errors import UserError

# CPUs left for Ray Data's read and augmentation tasks beside each trainer's workers.
DATA_CPUS = 1
# A CPU node gets one single-threaded embedding actor per core up to this many; past it, actors share the
# node's cores as torch threads. A team of threads waits at every op for any member that one of Ray's own
# processes preempted; separate processes do not. On 2 cores, two 1-thread actors embedded 60k images faster
# than one 2-thread actor in 6 of 8 paired rounds (medians 53.2 vs 58.2 s in one run of 4; this machine drifts).
MAX_CPU_ACTORS_PER_NODE = 8


@dataclass(frozen=True)
class TrainPlan:
    """Workers per backbone, on GPUs or not, and how many backbones (or trials) train at once."""

    num_workers: int
    use_gpu: bool
    concurrent: int


def cluster_cpus_gpus() -> tuple[int, int]:
    import ray

    resources = ray.cluster_resources()
    return int(resources.get("CPU", 1)), int(resources.get("GPU", 0))


def plan_training(use_gpu: str, num_workers: int | None, backbones: int, cpus: int, gpus: int) -> TrainPlan:
    """GPU use, workers per backbone (default: 1, or the GPUs split between the backbones) and how many
    backbones fit at once, each with its workers and Ray Data's share of CPUs."""
    on_gpu = resolve_use_gpu(use_gpu, gpus, "the Ray cluster")
    workers = num_workers or (max(1, gpus // backbones) if on_gpu else 1)
    if on_gpu and workers > gpus:
        raise UserError(f"--num-workers {workers} needs {workers} GPUs; the cluster has {gpus}")
    if workers + DATA_CPUS > cpus:
        raise UserError(f"--num-workers {workers} needs {workers + DATA_CPUS} CPUs with Ray Data's share; "
                        f"the cluster has {cpus}")
    by_cpu = max(1, (cpus - DATA_CPUS) // workers)
    concurrent = min(by_cpu, gpus // workers) if on_gpu else by_cpu
    return TrainPlan(workers, on_gpu, max(1, concurrent))


def plan_trials(workers: int, use_gpu: bool, cpus: int, gpus: int) -> int:
    """Tune trials that fit at once: each holds 1 CPU for its driver, ``workers`` CPUs (and GPUs) and Ray
    Data's share. More would leave Ray Data's read tasks unscheduled behind idle trial drivers."""
    by_cpu = cpus // (1 + workers + DATA_CPUS)
    return max(1, min(by_cpu, gpus // workers) if use_gpu else by_cpu)


def cpu_actors_per_node(node_cpus: int, cores: int | None = None) -> int:
    """CPU embedding actors for a node with ``node_cpus`` Ray CPUs and ``cores`` cores (when known: a local Ray
    advertises more logical CPUs than the machine has, see ``onray.runtime.local_num_cpus``)."""
    return max(1, min(MAX_CPU_ACTORS_PER_NODE, node_cpus, cores or node_cpus))


def actor_plan(use_gpu: str, num_actors: int = 0) -> dict[str, Any]:
    """``map_batches`` resources of the embedding actors on the running cluster: one actor per GPU
    (``num_gpus=1``), else :func:`cpu_actors_per_node` per node."""
    import ray

    _, gpus = cluster_cpus_gpus()
    on_gpu = resolve_use_gpu(use_gpu, gpus, "the Ray cluster")
    here = ray.util.get_node_ip_address()
    cpu_nodes = [(int(node["Resources"].get("CPU", 0)), node["NodeManagerAddress"] == here)
                 for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]
    if num_actors:
        actors = num_actors
    elif on_gpu:
        actors = gpus
    else:
        actors = sum(cpu_actors_per_node(cpus, os.cpu_count() if local else None) for cpus, local in cpu_nodes)
    actors = max(1, actors)
    return {"compute": ray.data.ActorPoolStrategy(size=actors), "num_gpus": 1 if on_gpu else 0, "num_cpus": 1,
            "actors": actors, "actors_per_node": math.ceil(actors / max(1, len(cpu_nodes))), "on_gpu": on_gpu}
