"""Resource plans over a cluster's shape: how many Train workers, concurrent backbones or trials, and embedding
actors fit, on which nodes, and what the autoscaler is asked for. Pure functions of the nodes that are up and the
node types the autoscaler can add (no Ray), so every cluster shape can be tested without one; :mod:`onray.plan`
reads the running cluster and calls them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
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
# CPUs each Train worker asks for (beside its GPU share).
WORKER_CPUS = 1
# CPUs each Tune trial's own process holds.
TRIAL_CPUS = 1


# --- The cluster a plan is made over --------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeType:
    """A kind of worker node the autoscaler can add: its Ray ``cpus`` and ``gpus``, at most ``max_workers`` of
    them (those up included)."""

    name: str
    cpus: int
    gpus: int
    max_workers: int


@dataclass(frozen=True)
class Node:
    """A node of a plan: one that is ``up`` now (of ``node_type`` when its shape is one), or one of ``node_type``
    the autoscaler would have to add. ``head``: the head node, which never counts against a type's limit."""

    cpus: int
    gpus: int
    node_type: str = ""
    up: bool = True
    head: bool = False

    def describe(self) -> str:
        kind = "the head" if self.head else (f"a {self.node_type} node" if self.node_type else "a node")
        return f"{kind} ({self.gpus} GPU, {self.cpus} CPU{'' if self.up else ', to be added'})"


@dataclass(frozen=True)
class ClusterShape:
    """The nodes that are up and the node types the autoscaler can add (``source``: where they were read), with
    the launcher's cap on worker nodes in all (``max_workers``, None: no cap)."""

    nodes: tuple[Node, ...]
    node_types: tuple[NodeType, ...] = ()
    max_workers: int | None = None
    source: str = ""

    @property
    def cpus(self) -> int:
        return sum(node.cpus for node in self.nodes)

    @property
    def gpus(self) -> int:
        return sum(node.gpus for node in self.nodes)

    def reachable(self) -> list[Node]:
        """The nodes up, then those the autoscaler can still add: each type up to its ``max_workers`` (its nodes
        up counted), the GPU-richest types first while :attr:`max_workers` leaves room."""
        room = None if self.max_workers is None else max(0, self.max_workers - sum(not n.head for n in self.nodes))
        added: list[Node] = []
        for kind in sorted(self.node_types, key=lambda t: (-t.gpus, -t.cpus, t.name)):
            count = max(0, kind.max_workers - sum(n.node_type == kind.name and not n.head for n in self.nodes))
            if room is not None:
                count, room = min(count, room), room - min(count, room)
            added += [Node(kind.cpus, kind.gpus, kind.name, up=False)] * count
        return list(self.nodes) + added


def node_of_type(cpus: int, gpus: int, node_types: tuple[NodeType, ...], head: bool = False) -> Node:
    """An up node, named after the first node type of its shape (None of them: unnamed)."""
    name = next((t.name for t in node_types if (t.cpus, t.gpus) == (cpus, gpus) and not head), "")
    return Node(cpus, gpus, name, up=True, head=head)


def launcher_node_types(config: dict[str, Any]) -> tuple[tuple[NodeType, ...], int | None]:
    """The worker node types of a cluster-launcher config (``cluster.yaml``'s ``available_node_types`` without
    its ``head_node_type``; also the shape of ``CIFAR_EMBED_NODE_TYPES``) and its ``max_workers`` cap (None when
    it has none). A type without ``resources`` (the launcher fills them from the instance type) counts as none."""
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head or not isinstance(spec, dict):
            continue
        resources = spec.get("resources") or {}
        types.append(NodeType(str(name), int(resources.get("CPU", 0)), int(resources.get("GPU", 0)),
                              int(spec.get("max_workers", 0))))
    limit = config.get("max_workers")
    return tuple(types), None if limit is None else int(limit)


def launcher_max_gpus(config: dict[str, Any]) -> int:
    """GPUs a cluster-launcher config (``cluster.yaml``) can scale to: GPUs x ``max_workers`` per node type
    (the head counts once), capped by the config's ``max_workers`` worker nodes in all."""
    types, limit = launcher_node_types(config)
    head = (config.get("available_node_types") or {}).get(config.get("head_node_type"), {}) or {}
    head_gpus = int((head.get("resources") or {}).get("GPU", 0))
    shape = ClusterShape((Node(0, head_gpus, head=True),), types, limit)
    return sum(node.gpus for node in shape.reachable())


# --- Placing groups of workers on nodes -----------------------------------------------------------------------

# Where one group of workers (a backbone's trainer, a trial) goes: (node index in the plan's nodes, workers there).
Pieces = tuple[tuple[int, int], ...]


def spread_gpus(gpus_per_node: list[int], backbones: int) -> list[int]:
    """Whole-GPU workers of each of ``backbones`` backbones when the GPUs are at least as many: each backbone goes
    to the node with the most GPUs per backbone placed there (so its DDP workers stay on one node), and each
    node's GPUs are split between its backbones, the spare ones going to the first. Every GPU of a node that gets
    a backbone gets a worker."""
    return [workers for [(_, workers)] in _spread(gpus_per_node, backbones)]


def _spread(gpus_per_node: list[int], backbones: int) -> list[Pieces]:
    placed: list[list[int]] = [[] for _ in gpus_per_node]
    for backbone in range(backbones):
        node = max(range(len(gpus_per_node)), key=lambda n: (gpus_per_node[n] / (len(placed[n]) + 1), -n))
        placed[node].append(backbone)
    pieces: list[Pieces] = [()] * backbones
    for node, (gpus, members) in enumerate(zip(gpus_per_node, placed, strict=True)):
        for position, backbone in enumerate(members):
            pieces[backbone] = ((node, gpus // len(members) + (position < gpus % len(members))),)
    return pieces


def _pack(groups: list[int], free: list[int]) -> list[Pieces]:
    """The first groups (of workers each) that fit at once, in order, into nodes with ``free`` worker slots: a group
    goes whole onto the first node with room for it (nodes up come first, so nothing is added that need not be),
    else across the nodes with the most room; the first group that fits nowhere ends the wave."""
    free, placed = list(free), []
    for workers in groups:
        node = next((n for n, room in enumerate(free) if room >= workers), None)
        if node is not None:
            free[node] -= workers
            placed.append(((node, workers),))
            continue
        if sum(free) < workers:
            break
        pieces, left = [], workers
        for node in sorted(range(len(free)), key=lambda n: (-free[n], n)):
            take = min(free[node], left)
            if take:
                pieces.append((node, take))
                free[node], left = free[node] - take, left - take
        placed.append(tuple(sorted(pieces)))
    return placed


@dataclass(frozen=True)
class TrainPlan:
    """Workers per backbone, on GPUs or not, how many backbones (or trials) train at once and each worker's
    share of a GPU. ``workers`` lists each backbone's workers (in ``--backbones`` order) when spare GPUs
    made them differ; ``num_workers`` is then the most any backbone has. On GPUs, ``placements`` holds where the
    workers of each of the first :attr:`concurrent` backbones go, as (index in ``nodes``, workers) pieces."""

    num_workers: int
    use_gpu: bool
    concurrent: int
    gpus_per_worker: float = 1.0
    workers: tuple[int, ...] = ()
    placements: tuple[Pieces, ...] = ()
    nodes: tuple[Node, ...] = field(default=(), compare=False)

    def workers_of(self, backbone_index: int) -> int:
        return self.workers[backbone_index] if self.workers else self.num_workers

    def gpus_needed(self, backbones: int) -> int:
        """Whole GPUs the first :attr:`concurrent` of ``backbones`` backbones occupy at once."""
        workers = sum(self.workers_of(i) for i in range(min(self.concurrent, backbones)))
        return math.ceil(workers * self.gpus_per_worker - 1e-9) if self.use_gpu else 0

    def nodes_of(self, backbone_index: int) -> int:
        """Nodes the workers of backbone ``backbone_index`` span (its first wave's placement; else 1)."""
        index = backbone_index if backbone_index < len(self.placements) else backbone_index % max(1, self.concurrent)
        return len(self.placements[index]) if index < len(self.placements) else 1

    def node_type_of(self, backbone_index: int) -> str:
        """What its workers run on: a node type's name, 'the head', 'CPU nodes' or 'nodes that are up'."""
        if not self.use_gpu:
            return "CPU nodes"
        index = backbone_index if backbone_index < len(self.placements) else backbone_index % max(1, self.concurrent)
        if index >= len(self.placements) or not self.nodes:
            return "GPU nodes"
        names = {self.nodes[n].node_type or ("the head" if self.nodes[n].head else "a node that is up")
                 for n, _ in self.placements[index]}
        return ", ".join(sorted(names))

    def bundles(self) -> list[dict[str, float]]:
        """What the autoscaler is asked for, in the plan's shapes: one bundle per node a placed backbone's workers
        share ({GPU: their GPUs, CPU: their CPUs}), so it picks a node type that holds each."""
        return _bundles(self.placements, self.gpus_per_worker, WORKER_CPUS)

    def nodes_to_add(self) -> dict[str, int]:
        """Node type -> how many nodes of it the plan needs the autoscaler to add."""
        return _added(self.placements, self.nodes)


def _bundles(placements: tuple[Pieces, ...] | list[Pieces], gpus_per_worker: float,
             cpus_per_worker: int) -> list[dict[str, float]]:
    return [{"GPU": round(workers * gpus_per_worker, 4), "CPU": workers * cpus_per_worker}
            for pieces in placements for _, workers in pieces]


def _added(placements: tuple[Pieces, ...] | list[Pieces], nodes: tuple[Node, ...]) -> dict[str, int]:
    used = {node for pieces in placements for node, _ in pieces if not nodes[node].up}
    return dict(sorted(Counter(nodes[node].node_type for node in used).items()))


def _worker_slots(node: Node, share: float) -> int:
    """Workers of ``share`` GPU each that ``node`` holds: its GPUs' shares, one CPU each."""
    return min(math.floor(node.gpus / share + 1e-9), node.cpus // WORKER_CPUS)


def plan_training(use_gpu: str, num_workers: int | None, backbones: int, cluster: ClusterShape,
                  gpus_per_worker: str = "auto") -> TrainPlan:
    """GPU use, workers per backbone, each worker's GPU share, how many backbones train at once and on which nodes
    (up, or of the node types the autoscaler can add: ``cluster.reachable()``).

    On GPUs, ``gpus_per_worker="auto"`` and no ``num_workers``: with fewer GPUs than backbones each backbone gets
    one worker with 1/n of a GPU, n = ceil(backbones / GPUs), so all train at once; otherwise whole GPUs, each
    backbone on a node of its own while there are nodes for it (:func:`spread_gpus`: its DDP ranks on one node),
    every GPU of those nodes used. A worker of a backbone with several DDP workers never shares a GPU (NCCL cannot
    run two ranks on one device). On CPUs, the CPUs up now decide (a CPU job does not wait for nodes).
    """
    reachable = cluster.reachable()
    gpus = sum(node.gpus for node in reachable)
    on_gpu = resolve_use_gpu(use_gpu, gpus, "the Ray cluster")
    cpus = cluster.cpus
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
    gpu_nodes = [i for i, node in enumerate(reachable) if node.gpus]
    slots = [_worker_slots(reachable[i], share) for i in gpu_nodes]
    if num_workers is None and share >= 1.0 and gpus >= backbones:
        placements = [tuple((gpu_nodes[n], w) for n, w in pieces) for pieces in _spread(slots, backbones)]
        workers = [sum(w for _, w in pieces) for pieces in placements]
    else:
        workers = [num_workers or 1] * backbones
        placements = [tuple((gpu_nodes[n], w) for n, w in pieces) for pieces in _pack(workers, slots)]
    most = max(workers)
    if most > sum(slots):
        raise UserError(f"--num-workers {most} needs {math.ceil(most * share - 1e-9)} GPUs; the cluster has {gpus}"
                        f"{' or can add' if cluster.node_types else ''}")
    _check_cpus(most, sum(node.cpus for node in reachable))
    # Ray Data's tasks need CPUs beside the workers: drop backbones from the wave until they have them
    while len(placements) > 1 and _spare_cpus(placements, reachable) < DATA_CPUS:
        placements.pop()
    same = len(set(workers)) == 1
    return TrainPlan(most, True, len(placements), share, () if same else tuple(workers), tuple(placements),
                     tuple(reachable))


def _spare_cpus(placements: list[Pieces], nodes: list[Node]) -> int:
    used = {node for pieces in placements for node, _ in pieces}
    cpus = sum(node.cpus for i, node in enumerate(nodes) if node.up or i in used)
    return cpus - sum(w * WORKER_CPUS for pieces in placements for _, w in pieces)


def _check_cpus(workers: int, cpus: int) -> None:
    if workers + DATA_CPUS > cpus:
        raise UserError(f"--num-workers {workers} needs {workers + DATA_CPUS} CPUs with Ray Data's share; "
                        f"the cluster has {cpus}")


@dataclass(frozen=True)
class TrialPlan:
    """Tune trials at once (``concurrent``), each with ``workers`` workers on GPUs or CPUs, and where the first
    wave's workers go (``placements`` over ``nodes``, as in :class:`TrainPlan`)."""

    concurrent: int
    workers: int
    use_gpu: bool
    placements: tuple[Pieces, ...] = ()
    nodes: tuple[Node, ...] = field(default=(), compare=False)

    def bundles(self) -> list[dict[str, float]]:
        return _bundles(self.placements, 1.0, WORKER_CPUS)

    def nodes_to_add(self) -> dict[str, int]:
        return _added(self.placements, self.nodes)


def plan_trials(workers: int, use_gpu: bool, cluster: ClusterShape) -> TrialPlan:
    """Tune trials that fit at once: each holds :data:`TRIAL_CPUS` for its driver, ``workers`` CPUs (and whole
    GPUs, on one node when one holds them, of the nodes up or that the autoscaler can add) and Ray Data's share.
    More would leave Ray Data's read tasks unscheduled behind idle trial drivers."""
    if not use_gpu:
        return TrialPlan(max(1, cluster.cpus // (TRIAL_CPUS + workers + DATA_CPUS)), workers, False)
    reachable = cluster.reachable()
    gpu_nodes = [i for i, node in enumerate(reachable) if node.gpus]
    slots = [_worker_slots(reachable[i], 1.0) for i in gpu_nodes]
    # as many trials as the GPUs hold, each on one node where it can be (no more than fit at all)
    most = max(1, sum(slots) // workers)
    placements = [tuple((gpu_nodes[n], w) for n, w in pieces) for pieces in _pack([workers] * most, slots)]
    while len(placements) > 1 and _spare_cpus(placements, reachable) < len(placements) * (TRIAL_CPUS + DATA_CPUS):
        placements.pop()
    return TrialPlan(max(1, len(placements)), workers, True, tuple(placements), tuple(reachable))


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


# --- Embedding actors ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActorPlan:
    """The embedding actor pool: ``actors`` actors, on GPUs (one each) or CPUs, ``actors_per_node`` of them on a
    node at most (CPU actors split its cores between them). On GPUs, ``placements`` holds the actors per node
    (over ``nodes``, as in :class:`TrainPlan`)."""

    actors: int
    on_gpu: bool
    actors_per_node: int
    placements: tuple[Pieces, ...] = ()
    nodes: tuple[Node, ...] = field(default=(), compare=False)

    @property
    def gpus_per_actor(self) -> int:
        return 1 if self.on_gpu else 0

    @property
    def cpus_per_actor(self) -> int:
        return ACTOR_CPUS

    def bundles(self) -> list[dict[str, float]]:
        """One {GPU: 1, CPU: 1} bundle per actor: an actor is one process on one node."""
        return [{"GPU": 1, "CPU": ACTOR_CPUS}] * self.actors if self.on_gpu else []

    def nodes_to_add(self) -> dict[str, int]:
        return _added(self.placements, self.nodes)


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


def plan_gpu_actors(cluster: ClusterShape, num_actors: int = 0) -> ActorPlan:
    """The GPU embedding actor pool over the nodes up and those the autoscaler can add: ``num_actors`` (else one
    per reachable GPU) actors of one GPU and :data:`ACTOR_CPUS` each, packed onto the nodes up first; at most what
    the GPUs hold and what the CPUs hold beside :data:`READER_CPUS`."""
    reachable = cluster.reachable()
    gpu_nodes = [i for i, node in enumerate(reachable) if node.gpus]
    slots = [min(reachable[i].gpus, reachable[i].cpus // ACTOR_CPUS) for i in gpu_nodes]
    wanted = min(num_actors or sum(slots), sum(slots))
    if num_actors and num_actors > wanted:
        log(f"--num-actors {num_actors} is more than the {wanted} GPU actor(s) this cluster can hold; using {wanted}")
    placements = [tuple((gpu_nodes[n], w) for n, w in pieces) for pieces in _pack([1] * max(1, wanted), slots)]
    while len(placements) > 1 and _spare_cpus(placements, reachable) < READER_CPUS:
        placements.pop()
    per_node = Counter(node for pieces in placements for node, _ in pieces)
    return ActorPlan(actors=len(placements), on_gpu=True, actors_per_node=max(per_node.values(), default=1),
                     placements=tuple(placements), nodes=tuple(reachable))


# --- A job's plan, as --dry-run prints it ---------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedGroup:
    """One backbone's (or trial's, or model's) part of a plan: its ``workers`` (Train workers or embedding actors),
    each one's GPU share, how many ``nodes`` they span and on what (``node_type``); with the data known, the
    ``images_per_epoch``, ``steps_per_epoch`` (each worker's batches of ``batch_size``) and ``epochs``."""

    name: str
    workers: int
    gpus_per_worker: float
    nodes: int
    node_type: str
    images_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    epochs: int | None = None


@dataclass(frozen=True)
class JobPlan:
    """What a job would run where: ``groups`` (``concurrent`` of them at once), the whole GPUs they occupy
    (``gpus_used``), what the autoscaler would be asked for (``gpus_requested`` GPUs as ``bundles``, so
    ``nodes_to_add`` nodes of each type) over ``cluster``; a pipeline's ``stages`` are plans of their own."""

    job: str
    on_gpu: bool
    concurrent: int
    groups: tuple[PlannedGroup, ...]
    cluster: ClusterShape
    gpus_used: int = 0
    gpus_requested: int = 0
    bundles: tuple[dict[str, float], ...] = ()
    nodes_to_add: dict[str, int] = field(default_factory=dict)
    unit: str = "backbones"
    notes: tuple[str, ...] = ()
    stages: tuple[tuple[str, JobPlan], ...] = ()

    def document(self) -> dict[str, Any]:
        """The plan as one JSON-ready object: ``concurrent``, ``gpus_requested``, ``backbones`` (each with ``name``,
        ``workers``, ``gpus_per_worker``, ``nodes``) and the rest, a pipeline's stages under ``stages``."""
        cluster = self.cluster
        document: dict[str, Any] = {
            "job": self.job, "on_gpu": self.on_gpu, "concurrent": self.concurrent, "unit": self.unit,
            "gpus_used": self.gpus_used, "gpus_requested": self.gpus_requested,
            "bundles": list(self.bundles), "nodes_to_add": dict(self.nodes_to_add),
            "backbones": [{key: value for key, value in vars(group).items() if value is not None}
                          for group in self.groups],
            "cluster": {"nodes_up": [{"cpus": n.cpus, "gpus": n.gpus, "node_type": n.node_type, "head": n.head}
                                     for n in cluster.nodes],
                        "node_types": [vars(t) for t in cluster.node_types], "max_workers": cluster.max_workers,
                        "node_types_from": cluster.source},
            "notes": list(self.notes)}
        if self.stages:
            document["stages"] = {name: stage.document() for name, stage in self.stages}
        return document

    def text(self) -> str:
        """The plan as a person reads it (what ``--dry-run`` prints)."""
        lines = [f"{self.job} --dry-run: nothing is trained or written, and the autoscaler is asked for nothing",
                 describe_cluster(self.cluster)]
        lines += [] if self.stages else self._body()
        for name, stage in self.stages:
            lines += ["", f"{name} stage:", *("  " + line for line in stage._body())]
        return "\n".join(lines) + "\n"

    def _body(self) -> list[str]:
        if not self.groups:
            return [*self.notes]
        width = max(len(group.name) for group in self.groups)
        lines = [f"{self.concurrent} of {len(self.groups)} {self.unit} at once, on {'GPUs' if self.on_gpu else 'CPUs'}:"]
        for group in self.groups:
            share = f" x {group.gpus_per_worker:.3g} GPU" if self.on_gpu else ""
            line = (f"  {group.name:<{width}}  {group.workers} {'actor' if self.unit == 'models' else 'worker'}(s)"
                    f"{share}, on {group.nodes} node(s): {group.node_type}")
            if group.images_per_epoch is not None:
                line += f"; {group.images_per_epoch:,} images per epoch"
                if group.steps_per_epoch is not None:
                    line += f", {group.steps_per_epoch} steps of {group.batch_size} per worker"
                if group.epochs is not None:
                    line += f", {group.epochs} epoch(s)"
            lines.append(line)
        if self.gpus_requested:
            shapes = ", ".join(f"{count} x {shape}" for shape, count in _shapes(self.bundles))
            added = ", ".join(f"{count} {name or 'unnamed'} node(s)" for name, count in self.nodes_to_add.items())
            lines.append(f"autoscaler: would be asked for {self.gpus_requested} GPU(s) as {shapes} -> {added}")
        elif self.on_gpu:
            lines.append(f"autoscaler: nothing to ask for; the {self.gpus_used} GPU(s) the plan uses are up")
        return lines + list(self.notes)


def _shapes(bundles: tuple[dict[str, float], ...]) -> list[tuple[str, int]]:
    counts: Counter[str] = Counter()
    for bundle in bundles:
        counts["{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items(), reverse=True)) + "}"] += 1
    return list(counts.items())


def describe_cluster(cluster: ClusterShape) -> str:
    """One line: the nodes up and what the autoscaler can add (and where that was read)."""
    kinds = Counter((n.cpus, n.gpus, "head" if n.head else n.node_type) for n in cluster.nodes)
    up = ", ".join(f"{count} x {name + ' ' if name else ''}({cpus} CPU, {gpus} GPU)"
                   for (cpus, gpus, name), count in kinds.items())
    line = f"cluster: {len(cluster.nodes)} node(s) up: {up or 'none'}"
    if cluster.node_types:
        types = ", ".join(f"{t.name} ({t.cpus} CPU, {t.gpus} GPU) up to {t.max_workers}" for t in cluster.node_types)
        cap = f", {cluster.max_workers} worker nodes in all" if cluster.max_workers is not None else ""
        line += f"; the autoscaler can add {types}{cap} (from {cluster.source})"
    else:
        line += "; no autoscaler node types known (the plan uses the nodes up)"
    return line


def training_job_plan(job: str, names: list[str], plan: TrainPlan | TrialPlan, cluster: ClusterShape,
                      gpus_up: int, epochs: list[int | None], batch_size: list[int | None],
                      images: int | None, steps: list[int | None], unit: str = "backbones",
                      notes: tuple[str, ...] = ()) -> JobPlan:
    """The :class:`JobPlan` of a training (``plan``: a :class:`TrainPlan`) or a tune (a :class:`TrialPlan`, one
    group per trial of the first wave) over ``cluster`` with ``gpus_up`` GPUs up now."""
    groups = []
    for i, name in enumerate(names):
        if isinstance(plan, TrainPlan):
            workers, share = plan.workers_of(i), plan.gpus_per_worker if plan.use_gpu else 0.0
            nodes, kind = plan.nodes_of(i), plan.node_type_of(i)
        else:
            workers, share = plan.workers, 1.0 if plan.use_gpu else 0.0
            pieces = plan.placements[i % len(plan.placements)] if plan.placements else ()
            nodes = len(pieces) or 1
            kind = ", ".join(sorted({plan.nodes[n].node_type or "a node that is up" for n, _ in pieces})) or \
                ("GPU nodes" if plan.use_gpu else "CPU nodes")
        groups.append(PlannedGroup(name, workers, share, nodes, kind, images, steps[i], batch_size[i], epochs[i]))
    on_gpu = plan.use_gpu
    used = plan.gpus_needed(len(names)) if isinstance(plan, TrainPlan) else (
        plan.concurrent * plan.workers if on_gpu else 0)
    asks = on_gpu and gpus_up < used
    return JobPlan(job, on_gpu, min(plan.concurrent, len(names)), tuple(groups), cluster, used,
                   used if asks else 0, tuple(plan.bundles()) if asks else (),
                   plan.nodes_to_add() if asks else {}, unit, notes)


def actors_job_plan(job: str, names: list[str], plan: ActorPlan, cluster: ClusterShape, gpus_up: int,
                    notes: tuple[str, ...] = ()) -> JobPlan:
    """The :class:`JobPlan` of an embedding pass: every model in ``names`` on the one actor pool of ``plan``."""
    nodes = len({node for pieces in plan.placements for node, _ in pieces}) or 1
    kinds = ", ".join(sorted({plan.nodes[n].node_type or "a node that is up" for p in plan.placements for n, _ in p}))
    groups = tuple(PlannedGroup(name, plan.actors, float(plan.gpus_per_actor), nodes,
                                kinds or ("GPU nodes" if plan.on_gpu else "CPU nodes")) for name in names)
    used = plan.actors if plan.on_gpu else 0
    asks = plan.on_gpu and gpus_up < used
    return JobPlan(job, plan.on_gpu, len(names), groups, cluster, used, used if asks else 0,
                   tuple(plan.bundles()) if asks else (), plan.nodes_to_add() if asks else {}, "models", notes)


def pipeline_job_plan(stages: list[tuple[str, JobPlan]]) -> JobPlan:
    """A pipeline's plan: its train stage's groups and concurrency at the top, the most GPUs any stage asks for, and
    every stage's own plan."""
    train = dict(stages)["train"]
    return JobPlan("jobs.pipeline", train.on_gpu, train.concurrent, train.groups, train.cluster,
                   max(stage.gpus_used for _, stage in stages), max(stage.gpus_requested for _, stage in stages),
                   train.bundles, train.nodes_to_add, train.unit, (), tuple(stages))
