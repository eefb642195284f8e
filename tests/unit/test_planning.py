"""Resource plans over cluster shapes (pure functions: no Ray) and the one GPU rule behind them."""

import pytest

from lib.devices import resolve_use_gpu
from lib.errors import UserError
from lib.planning import (
    ActorPlan,
    ClusterShape,
    NodeType,
    cpu_actors_per_node,
    launcher_node_types,
    node_of_type,
    plan_actors,
    plan_gpu_actors,
    plan_training,
    plan_trials,
    training_job_plan,
)


@pytest.mark.parametrize(("use_gpu", "gpus", "expected"), [
    ("auto", 0, False), ("auto", 2, True), ("false", 2, False), ("true", 1, True), (True, 1, True), (False, 4, False),
])
def test_use_gpu_is_resolved_by_one_rule(use_gpu, gpus, expected):
    assert resolve_use_gpu(use_gpu, gpus, "the Ray cluster") is expected


def test_insisting_on_gpus_where_there_are_none_names_the_place_and_the_way_out():
    with pytest.raises(UserError) as caught:
        resolve_use_gpu("true", 0, "the Ray cluster")
    assert str(caught.value) == "--use-gpu true, but the Ray cluster has no GPUs (use --use-gpu auto or false)"
    with pytest.raises(UserError, match="--use-gpu must be auto, true or false, got 'sometimes'"):
        resolve_use_gpu("sometimes", 1, "faiss")


def up(*nodes: tuple[int, int], types: tuple[NodeType, ...] = (), max_workers: int | None = None) -> ClusterShape:
    """A cluster of nodes up, (CPUs, GPUs) each, the first the head, and the node types the autoscaler can add."""
    return ClusterShape(tuple(node_of_type(cpus, gpus, types, head=i == 0) for i, (cpus, gpus) in enumerate(nodes)),
                        types, max_workers, "test")


def one_node(cpus: int, gpus: int) -> ClusterShape:
    return up((cpus, gpus))


@pytest.mark.parametrize(("use_gpu", "workers", "backbones", "cpus", "gpus", "expected"), [
    ("auto", None, 3, 4, 0, (1, False, 3)),   # the local Ray of a 2-core machine: 4 logical CPUs
    ("auto", None, 3, 16, 0, (1, False, 15)),
    ("auto", 4, 2, 16, 8, (4, True, 2)),
    ("false", None, 3, 16, 8, (1, False, 15)),
])
def test_training_plans_over_cluster_shapes(use_gpu, workers, backbones, cpus, gpus, expected):
    plan = plan_training(use_gpu, workers, backbones, one_node(cpus, gpus))
    assert (plan.num_workers, plan.use_gpu, plan.concurrent) == expected


@pytest.mark.parametrize(("gpus_per_node", "backbones", "share", "workers", "concurrent"), [
    ([1], 3, 1 / 3, [1, 1, 1], 3),        # one GPU: the three backbones share it, all at once
    ([1], 2, 1 / 2, [1, 1], 2),
    ([1], 1, 1.0, [1], 1),
    ([2], 3, 1 / 2, [1, 1, 1], 3),        # 2/3 would not pack (two shares of 2/3 overflow a GPU): halves do
    ([2], 2, 1.0, [1, 1], 2),
    ([8], 3, 1.0, [3, 3, 2], 3),          # the two spare GPUs go to more workers
    ([8], 1, 1.0, [8], 1),
    ([4, 4], 3, 1.0, [2, 4, 2], 3),       # two nodes x 4: each backbone's DDP workers on one node
    ([4, 4], 2, 1.0, [4, 4], 2),
    ([2, 2], 3, 1.0, [1, 2, 1], 3),
])
def test_gpus_are_shared_or_spread_so_every_backbone_trains_at_once(gpus_per_node, backbones, share, workers,
                                                                    concurrent):
    gpus = sum(gpus_per_node)
    plan = plan_training("auto", None, backbones, up(*[(32, g) for g in gpus_per_node]), "auto")
    assert plan.use_gpu and plan.gpus_per_worker == pytest.approx(share) and plan.concurrent == concurrent
    assert [plan.workers_of(i) for i in range(backbones)] == workers
    assert all(plan.nodes_of(i) == 1 for i in range(backbones))  # no backbone's ranks span nodes
    # never more GPU than the cluster has, and no GPU idle where a worker could use it
    assert plan.gpus_needed(backbones) <= gpus
    assert sum(workers) * share == pytest.approx(gpus) or share < 1
    assert not plan.nodes_to_add()  # everything is up: nothing to ask the autoscaler for


HEAD = (6, 0)  # cluster.yaml's CPU-only head
GPU_1 = NodeType("gpu", cpus=8, gpus=1, max_workers=4)  # cluster.yaml's and the RayJob's one-GPU workers, from zero
GPU_4 = NodeType("gpu4", cpus=32, gpus=4, max_workers=2)


@pytest.mark.parametrize(("name", "cluster", "workers", "share", "nodes_added", "bundles"), [
    ("1 GPU", up((16, 1)), [1, 1, 1], 1 / 3, {}, None),
    ("1x8", up((64, 8)), [3, 3, 2], 1.0, {}, None),
    ("4x1 from zero", up(HEAD, types=(GPU_1,)), [1, 1, 1], 1.0, {"gpu": 3}, [{"GPU": 1, "CPU": 1}] * 3),
    ("2x4 from zero", up(HEAD, types=(GPU_4,)), [2, 4, 2], 1.0, {"gpu4": 2},
     [{"GPU": 2, "CPU": 2}, {"GPU": 4, "CPU": 4}, {"GPU": 2, "CPU": 2}]),
    ("2x4 up", up(HEAD, (32, 4), (32, 4), types=(GPU_4,)), [2, 4, 2], 1.0, {}, None),
    ("one 1-GPU node up, three more from zero", up(HEAD, (8, 1), types=(GPU_1,)), [1, 1, 1], 1.0, {"gpu": 2},
     [{"GPU": 1, "CPU": 1}] * 3),
])
def test_three_backbones_at_once_each_on_one_node_over_the_node_types(name, cluster, workers, share, nodes_added,
                                                                      bundles):
    plan = plan_training("auto", None, 3, cluster)
    assert plan.use_gpu and plan.concurrent == 3, name  # the head's 6 CPUs do not hold the GPU nodes' workers back
    assert [plan.workers_of(i) for i in range(3)] == workers, name
    assert plan.gpus_per_worker == pytest.approx(share), name
    assert [plan.nodes_of(i) for i in range(3)] == [1, 1, 1], name
    assert plan.nodes_to_add() == nodes_added, name
    if bundles is not None:  # the autoscaler is asked for what the plan places, one bundle per node it shares
        assert plan.bundles() == bundles, name
        assert sum(b["GPU"] for b in plan.bundles()) == plan.gpus_needed(3), name


def test_a_cpu_only_cluster_trains_on_cpus_and_insisting_on_gpus_says_so():
    plan = plan_training("auto", None, 3, up((16, 0), (8, 0)))
    assert (plan.use_gpu, plan.num_workers, plan.concurrent, plan.bundles()) == (False, 1, 23, [])
    with pytest.raises(UserError, match="no GPUs"):
        plan_training("true", None, 3, up((16, 0)))


def test_ranks_span_nodes_only_when_no_node_type_holds_them():
    plan = plan_training("auto", 4, 1, up(HEAD, types=(GPU_1,)))
    assert (plan.workers_of(0), plan.nodes_of(0)) == (4, 4)
    plan = plan_training("auto", 4, 2, up(HEAD, types=(GPU_1, GPU_4)))
    assert [plan.nodes_of(i) for i in range(2)] == [1, 1] and plan.nodes_to_add() == {"gpu4": 2}
    with pytest.raises(UserError, match="--num-workers 5 needs 5 GPUs; the cluster has 4 or can add"):
        plan_training("auto", 5, 1, up(HEAD, types=(GPU_1,)))


def test_the_launchers_cap_on_worker_nodes_limits_what_is_reachable():
    shape = up(HEAD, types=(NodeType("big", 64, 8, 1), GPU_1), max_workers=2)
    assert [(n.node_type, n.up) for n in shape.reachable()] == [("", True), ("big", False), ("gpu", False)]
    types, limit = launcher_node_types({"head_node_type": "h", "max_workers": 3, "available_node_types": {
        "h": {"resources": {"CPU": 6}}, "g": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4}}})
    assert (types, limit) == ((NodeType("g", 8, 1, 4),), 3)


def test_explicit_gpu_shares_and_their_limits():
    plan = plan_training("auto", None, 3, one_node(16, 1), "0.25")
    assert (plan.gpus_per_worker, plan.num_workers, plan.concurrent) == (0.25, 1, 3)
    assert plan_training("auto", None, 3, one_node(16, 1), "1").concurrent == 1  # whole GPUs: the backbones queue
    with pytest.raises(UserError, match="cannot share a GPU"):
        plan_training("auto", 2, 3, one_node(16, 1), "0.5")
    with pytest.raises(UserError, match="a number in \\(0, 1\\]"):
        plan_training("auto", None, 3, one_node(16, 1), "1.5")


@pytest.mark.parametrize(("workers", "use_gpu", "cluster", "expected"), [
    (1, False, one_node(4, 0), 1),        # the test session's Ray
    (1, False, one_node(16, 0), 5),
    (1, True, one_node(32, 4), 4),
    (2, True, one_node(32, 4), 2),
    (4, True, one_node(8, 8), 1),
    (1, True, up(HEAD, types=(GPU_1,)), 4),   # from zero: one trial per GPU node the autoscaler can add
    (2, True, up(HEAD, types=(GPU_4,)), 4),   # two trials per 4-GPU node
])
def test_trials_leave_room_for_workers_and_ray_data(workers, use_gpu, cluster, expected):
    plan = plan_trials(workers, use_gpu, cluster)
    assert plan.concurrent == expected
    if use_gpu:
        assert all(len(pieces) == 1 for pieces in plan.placements)  # each trial's workers on one node
        assert sum(b["GPU"] for b in plan.bundles()) == expected * workers
    assert cpu_actors_per_node(4, 2) == 2


def test_gpu_embedding_actors_are_planned_over_the_node_types():
    plan = plan_gpu_actors(up(HEAD, types=(GPU_1,)))
    assert (plan.actors, plan.on_gpu, plan.nodes_to_add(), plan.bundles()) == (
        4, True, {"gpu": 4}, [{"GPU": 1, "CPU": 1}] * 4)
    plan = plan_gpu_actors(up(HEAD, (8, 1), types=(GPU_1,)), num_actors=2)
    assert (plan.actors, plan.nodes_to_add()) == (2, {"gpu": 1})  # the node up first
    assert plan_gpu_actors(up((16, 1))).actors == 1


def test_the_dry_run_document_holds_what_the_jobs_promise():
    cluster = up(HEAD, types=(GPU_1,))
    plan = plan_training("auto", None, 3, cluster)
    document = training_job_plan("jobs.train", ["densenet121", "resnet50", "vgg16"], plan, cluster, 0,
                                 [30] * 3, [256] * 3, 45000, [192] * 3).document()
    assert (document["concurrent"], document["gpus_requested"], document["gpus_used"]) == (3, 3, 3)
    assert document["nodes_to_add"] == {"gpu": 3}
    assert [(b["name"], b["workers"], b["gpus_per_worker"], b["nodes"]) for b in document["backbones"]] == [
        ("densenet121", 1, 1.0, 1), ("resnet50", 1, 1.0, 1), ("vgg16", 1, 1.0, 1)]
    text = training_job_plan("jobs.train", ["densenet121", "resnet50", "vgg16"], plan, cluster, 0,
                             [30] * 3, [256] * 3, 45000, [192] * 3).text()
    assert "3 of 3 backbones at once, on GPUs" in text and "3 x {GPU: 1, CPU: 1} -> 3 gpu node(s)" in text
    # GPUs that are up already are not asked for
    local = one_node(16, 1)
    assert training_job_plan("jobs.train", ["a"], plan_training("auto", None, 1, local), local, 1, [1], [16], None,
                             [None]).document()["gpus_requested"] == 0


@pytest.mark.parametrize(("nodes", "expected"), [
    ([(4, 2)], 2),                        # the local Ray of a 2-core machine: one actor per core
    ([(2, None)] * 3, 5),                 # three 2-CPU nodes: one CPU stays with the read tasks
    ([(2, None), (2, None), (2, None), (1, None), (1, None)], 7),
    ([(1, None)], 1),                     # a pool never has fewer than one actor
    ([(16, None)] * 2, 16),               # capped at MAX_CPU_ACTORS_PER_NODE (8) per node
])
def test_embedding_actors_leave_a_cpu_to_the_read_tasks(nodes, expected):
    from lib.planning import plan_cpu_actors

    assert plan_cpu_actors(nodes) == expected


@pytest.mark.parametrize(("on_gpu", "gpus", "nodes", "num_actors", "expected"), [
    (False, 0, [(4, 2)], 0, ActorPlan(actors=2, on_gpu=False, actors_per_node=2)),   # one per core
    (True, 4, [(8, None), (8, None)], 0, ActorPlan(actors=4, on_gpu=True, actors_per_node=2)),  # one per GPU
    (True, 8, [(4, None)], 0, ActorPlan(actors=3, on_gpu=True, actors_per_node=3)),  # a CPU each: 3 beside the reader
    (False, 0, [(4, 2)], 3, ActorPlan(actors=3, on_gpu=False, actors_per_node=3)),   # --num-actors, room for it
    (False, 0, [(2, None)], 5, ActorPlan(actors=1, on_gpu=False, actors_per_node=1)),  # capped at the room
])
def test_embedding_actor_pools_over_cluster_shapes(on_gpu, gpus, nodes, num_actors, expected):
    plan = plan_actors(on_gpu, gpus, nodes, num_actors)
    assert plan == expected
    assert (plan.gpus_per_actor, plan.cpus_per_actor) == ((1, 1) if on_gpu else (0, 1))


@pytest.mark.parametrize("job", ["train", "tune", "evaluate", "pipeline"])
def test_the_planning_jobs_offer_dry_run_and_json_alone_is_refused(job, capsys):
    import importlib

    module = importlib.import_module(f"jobs.{job}")
    with pytest.raises(SystemExit):
        module.cli(["--help"])
    text = capsys.readouterr().out
    assert "--dry-run" in text and "--json" in text
    required = {"train": ["--data-dir", "/d", "--run-dir", "/r"], "tune": ["--data-dir", "/d", "--run-dir", "/r"],
                "evaluate": ["--data-dir", "/d", "--run-dir", "/r"], "pipeline": ["--source", "cifar10", "--run-dir", "/r"]}
    assert module.cli([*required[job], "--json"]) == 2  # refused before any Ray starts
    assert "--json goes with --dry-run" in capsys.readouterr().err
