"""Resource plans over cluster shapes (pure functions: no Ray) and the one GPU rule behind them."""

import pytest

from lib.devices import resolve_use_gpu
from lib.errors import UserError
from onray.plan import TrainPlan, cpu_actors_per_node, plan_training, plan_trials


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
    ("auto", None, 3, 16, 1, TrainPlan(1, True, 1)),   # one GPU: the backbones queue for it
    ("auto", None, 3, 32, 8, TrainPlan(2, True, 4)),   # 8 GPUs: two workers per backbone
    ("auto", 4, 2, 16, 8, TrainPlan(4, True, 2)),
    ("false", None, 3, 16, 8, TrainPlan(1, False, 15)),
])
def test_training_plans_over_cluster_shapes(use_gpu, workers, backbones, cpus, gpus, expected):
    assert plan_training(use_gpu, workers, backbones, cpus, gpus) == expected


def test_impossible_training_plans_are_user_errors():
    with pytest.raises(UserError, match="needs 4 GPUs; the cluster has 2"):
        plan_training("auto", 4, 1, 16, 2)
    with pytest.raises(UserError, match="needs 5 CPUs with Ray Data's share; the cluster has 4"):
        plan_training("false", 4, 1, 4, 0)
    with pytest.raises(UserError, match="has no GPUs"):
        plan_training("true", None, 1, 16, 0)


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
    from onray.plan import plan_cpu_actors

    assert plan_cpu_actors(nodes) == expected
