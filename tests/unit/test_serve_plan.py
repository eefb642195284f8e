"""The gallery replica's resources: a share of a GPU when the cluster has GPUs (--use-gpu auto), CPUs otherwise,
and the deployment asks Ray for exactly that."""

import pytest

from lib.errors import UserError
from lib.planning import ReplicaPlan, plan_replica


@pytest.mark.parametrize("use_gpu, cluster_gpus, expected", [
    ("auto", 0, ReplicaPlan(cpus=4, gpus=0.0)),
    ("auto", 2, ReplicaPlan(cpus=4, gpus=0.25)),
    ("false", 2, ReplicaPlan(cpus=4, gpus=0.0)),
    ("true", 1, ReplicaPlan(cpus=4, gpus=0.25)),
])
def test_the_replica_takes_a_gpu_share_only_where_there_are_gpus(use_gpu, cluster_gpus, expected):
    plan = plan_replica(use_gpu, cluster_gpus, 0.25, cpus=4)
    assert plan == expected and plan.on_gpu == (expected.gpus > 0)


def test_bad_replica_settings_are_one_line():
    with pytest.raises(UserError, match="--use-gpu true, but the Ray cluster has no GPUs"):
        plan_replica("true", 0, 0.25, cpus=1)
    with pytest.raises(UserError, match=r"--gpus-per-replica must be in \(0, 1\]"):
        plan_replica("auto", 1, 1.5, cpus=1)
    with pytest.raises(UserError, match="--replica-cpus must be at least 1"):
        plan_replica("auto", 0, 0.25, cpus=0)


def test_the_deployment_asks_ray_for_the_planned_resources():
    from onray.serve import GallerySettings, gallery_deployment

    deployment = gallery_deployment(GallerySettings("/run", replica_cpus=3, replica_gpus=0.5))
    assert deployment.ray_actor_options["num_cpus"] == 3 and deployment.ray_actor_options["num_gpus"] == 0.5
    cpu_only = gallery_deployment(GallerySettings("/run"))
    assert cpu_only.ray_actor_options["num_gpus"] == 0.0 and cpu_only.ray_actor_options["num_cpus"] == 1


def test_jobs_serve_checks_its_gpu_share_before_ray():
    from jobs import serve

    assert serve.cli(["--run-dir", "/nowhere", "--gpus-per-replica", "0"]) == 2
