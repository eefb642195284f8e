"""Resource plans over cluster shapes (pure functions: no Ray) and the one GPU rule behind them."""

import pytest

from lib.devices import resolve_use_gpu
from lib.errors import UserError
from lib.planning import ActorPlan, TrainPlan, cpu_actors_per_node, plan_actors, plan_training, plan_trials


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


@pytest.mark.parametrize(("use_gpu", "workers", "backbones", "cpus", "gpus", "expected"), [
    ("auto", None, 3, 4, 0, TrainPlan(1, False, 3)),   # the local Ray of a 2-core machine: 4 logical CPUs
    ("auto", None, 3, 16, 0, TrainPlan(1, False, 15)),
    ("auto", 4, 2, 16, 8, TrainPlan(4, True, 2)),
    ("false", None, 3, 16, 8, TrainPlan(1, False, 15)),
])
def test_training_plans_over_cluster_shapes(use_gpu, workers, backbones, cpus, gpus, expected):
    assert plan_training(use_gpu, workers, backbones, cpus, gpus) == expected


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
    plan = plan_training("auto", None, backbones, 64, gpus, "auto", gpus_per_node)
    assert plan.use_gpu and plan.gpus_per_worker == pytest.approx(share) and plan.concurrent == concurrent
    assert [plan.workers_of(i) for i in range(backbones)] == workers
    # never more GPU than the cluster has, and no GPU idle where a worker could use it
    assert plan.gpus_needed(backbones) <= gpus
    assert sum(workers) * share == pytest.approx(gpus) or share < 1
    for node_gpus in gpus_per_node:  # what Ray's packing needs: whole shares per GPU
        assert node_gpus * round(1 / share) >= 1


def test_explicit_gpu_shares_and_their_limits():
    plan = plan_training("auto", None, 3, 16, 1, "0.25")
    assert (plan.gpus_per_worker, plan.num_workers, plan.concurrent) == (0.25, 1, 3)
    assert plan_training("auto", None, 3, 16, 1, "1").concurrent == 1  # whole GPUs: the backbones queue
    with pytest.raises(UserError, match="cannot share a GPU"):
        plan_training("auto", 2, 3, 16, 1, "0.5")
    with pytest.raises(UserError, match="a number in \\(0, 1\\]"):
        plan_training("auto", None, 3, 16, 1, "1.5")


def test_trials_leave_room_for_workers_and_ray_data():
    assert plan_trials(workers=1, use_gpu=False, cpus=4, gpus=0) == 1
    assert plan_trials(workers=1, use_gpu=True, cpus=32, gpus=4) == 4
    assert cpu_actors_per_node(4, 2) == 2


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
