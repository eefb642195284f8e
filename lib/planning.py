"""Resource plans over a cluster's shape: how many Train workers, concurrent backbones or trials, and embedding
actors fit. Pure functions of CPU and GPU counts (no Ray), so every cluster shape can be tested without one;
:mod:`onray.plan` reads the running cluster and calls them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lib.console import log
from lib.devices import gpu_share, resolve_use_gpu
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
# CPUs each embedding actor asks for.
ACTOR_CPUS = 1


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


@dataclass(frozen=True)
class ActorPlan:
    """The embedding actor pool: ``actors`` actors, on GPUs (one each) or CPUs, ``actors_per_node`` of them on a
    node at most (CPU actors split its cores between them)."""

    actors: int
    on_gpu: bool
    actors_per_node: int

    @property
    def gpus_per_actor(self) -> int:
        return 1 if self.on_gpu else 0

    @property
    def cpus_per_actor(self) -> int:
        return ACTOR_CPUS


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


def plan_trials(workers: int, use_gpu: bool, cpus: int, gpus: int) -> int:
    """Tune trials that fit at once: each holds 1 CPU for its driver, ``workers`` CPUs (and GPUs) and Ray
    Data's share. More would leave Ray Data's read tasks unscheduled behind idle trial drivers."""
    by_cpu = cpus // (1 + workers + DATA_CPUS)
    return max(1, min(by_cpu, gpus // workers) if use_gpu else by_cpu)


@dataclass(frozen=True)
class ReplicaPlan:
    """What the gallery's Serve replica asks Ray for: ``cpus`` (also its torch threads) and ``gpus`` (a share of
    one GPU, or 0 to run on CPUs)."""

    cpus: int
    gpus: float

    @property
    def on_gpu(self) -> bool:
        return self.gpus > 0


def plan_replica(use_gpu: str, cluster_gpus: int, gpu_share_of_replica: float, cpus: int) -> ReplicaPlan:
    """The replica's resources: a ``gpu_share_of_replica`` of one GPU when ``use_gpu`` resolves to GPUs on a
    cluster of ``cluster_gpus`` (``auto``: when it has some), else none; ``cpus`` CPUs either way."""
    if not 0.0 < gpu_share_of_replica <= 1.0:
        raise UserError(f"--gpus-per-replica must be in (0, 1], got {gpu_share_of_replica}")
    if cpus < 1:
        raise UserError(f"--replica-cpus must be at least 1, got {cpus}")
    on_gpu = resolve_use_gpu(use_gpu, cluster_gpus, "the Ray cluster")
    return ReplicaPlan(cpus=cpus, gpus=gpu_share_of_replica if on_gpu else 0.0)


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


def plan_actors(on_gpu: bool, gpus: int, cpu_nodes: list[tuple[int, int | None]], num_actors: int = 0) -> ActorPlan:
    """The embedding actor pool over ``gpus`` GPUs and ``cpu_nodes`` (Ray CPUs, cores when known): ``num_actors``
    when given (at most the CPUs beside the read tasks), else one actor per GPU, else :func:`plan_cpu_actors`."""
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
    return ActorPlan(actors=actors, on_gpu=on_gpu, actors_per_node=math.ceil(actors / max(1, len(cpu_nodes))))
