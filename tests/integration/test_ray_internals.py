"""onray/ray_internals.py against a live Ray (the session's): the private readers return what their callers use."""

from __future__ import annotations

import pytest

from onray import ray_internals

pytestmark = pytest.mark.usefixtures("ray_session")


def test_the_placement_group_table_lists_a_live_group_with_the_fields_tuning_reads():
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready(), timeout=60)
    try:
        records = ray_internals.placement_groups()
        assert records is not None
        mine = [r for r in records if r.placement_group_id == group.id.binary()]
        assert len(mine) == 1
        record = mine[0]
        assert record.state != type(record).REMOVED and not record.is_detached
        assert record.creator_job_id.hex() == ray.get_runtime_context().get_job_id()
        # a driver's own group has no creating actor: tuning.driver leaves it alone (groups that earlier tests of
        # the session left behind may be released here; this one must not be)
        from tuning.driver import release_orphaned_placement_groups

        release_orphaned_placement_groups()
        still = [r for r in ray_internals.placement_groups() if r.placement_group_id == group.id.binary()]
        assert len(still) == 1 and still[0].state != type(still[0]).REMOVED
    finally:
        remove_placement_group(group)


def test_a_local_ray_has_no_autoscaler_limits_and_a_session_folder():
    from pathlib import Path

    assert ray_internals.cluster_config_node_groups() == []
    assert Path(ray_internals.session_dir()).is_dir()
