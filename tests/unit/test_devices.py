"""The CPUs a local Ray and the torch threads are sized by: affinity, capped by the cgroup's CPU quota."""

import os

import pytest

from lib.devices import available_cpus, cgroup_cpu_limit
from onray.runtime import local_num_cpus


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "max 100000\n"}, None),                                            # cgroup v2, unlimited
    ({"cpu.max": "1600000 100000\n"}, 16.0),                                       # v2: 16 CPUs
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),     # v1, unlimited
    ({}, None),
])
def test_cgroup_cpu_quota_v1_and_v2(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_a_container_quota_caps_the_cpus_of_a_big_host(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: torch gets 2 threads, not the host's cores
    assert available_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity


def test_the_local_ray_is_sized_by_the_cpus_this_process_may_use():
    assert local_num_cpus() == max(4, available_cpus() + 2)
