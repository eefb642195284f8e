"""The private Ray APIs of onray/ray_internals.py still exist in the installed Ray (no Ray is started): a Ray
upgrade that renames one fails here, by name, before a job quietly loses what it gave."""

import inspect
import os

import pytest

from onray import ray_internals


def test_the_loopback_switch_is_the_one_ray_reads():
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == ray_internals.LOOPBACK_SWITCH
    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)


def test_hold_and_release_the_loopback_switch(monkeypatch):
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.delenv(ray_internals.LOOPBACK_SWITCH, raising=False)
    ray_internals.hold_node_on_loopback()
    assert os.environ[ray_internals.LOOPBACK_SWITCH] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    ray_internals.release_loopback_switch()
    assert ray_internals.LOOPBACK_SWITCH not in os.environ


def test_the_state_api_switch_is_the_one_ray_reads():
    from ray._private import ray_constants

    assert ray_constants.RAY_API_SERVER_ADDRESS_ENVIRONMENT_VARIABLE == ray_internals.STATE_API_ADDRESS_SWITCH


def test_ray_init_takes_the_temp_dir_keyword():
    import ray

    assert "_temp_dir" in inspect.getsource(ray.init)
    assert ray_internals.temp_dir_option("/tmp/x") == {"_temp_dir": "/tmp/x"}
    assert ray_internals.temp_dir_option(None) == {}


def test_the_hook_for_forwarded_worker_lines_exists():
    """onray.runtime.route_worker_lines replaces a handler of Ray's driver-side dispatcher of forwarded worker
    lines; if a Ray release renames it, worker chatter would reach the terminal again: this fails first."""
    from ray._private import worker

    dispatcher = worker.global_worker_stdstream_dispatcher
    assert callable(dispatcher.add_handler) and callable(dispatcher.remove_handler)
    assert ray_internals.STOCK_WORKER_LINE_HANDLER in inspect.getsource(worker)
    assert callable(worker.print_to_stdstream)  # what Ray's error listener prints the raylet's messages with


def test_the_session_and_state_readers_exist():
    from ray._private import state, worker
    from ray.core.generated import gcs_pb2

    assert hasattr(worker, "_global_node")
    assert callable(state.state.get_cluster_config)
    from ray.core.generated import autoscaler_pb2

    group = autoscaler_pb2.NodeGroupConfig()
    assert {"name", "resources", "min_count", "max_count"} <= {f.name for f in group.DESCRIPTOR.fields}
    assert callable(state.state._connect_and_get_accessor)
    record = gcs_pb2.PlacementGroupTableData()
    for field in ("state", "creator_actor_id", "creator_actor_dead", "creator_job_id", "is_detached",
                  "placement_group_id"):
        assert hasattr(record, field), field
    assert hasattr(type(record), "REMOVED")


def test_without_a_ray_the_state_readers_fall_back():
    import subprocess
    import sys

    # in a fresh process: the test session may already hold a Ray (the integration tests' fixture)
    code = ("import ray\nfrom onray import ray_internals\nassert not ray.is_initialized()\n"
            "assert ray_internals.placement_groups() is None\nprint('fell back')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fell back" in done.stdout, done.stderr[-2000:]


def test_the_launcher_check_rejects_a_bad_config():
    from jsonschema.exceptions import ValidationError

    with pytest.raises(ValidationError):
        ray_internals.validate_cluster_config({"cluster_name": "x", "max_workers": "many",
                                               "provider": {"type": "aws", "region": "us-west-2"}})


def test_a_working_dir_package_honours_rayignore(tmp_path):
    import zipfile

    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "keep.py").write_text("x = 1\n")
    (folder / "big.bin").write_bytes(b"0" * 10)
    (folder / ".rayignore").write_text("*.bin\n")
    ray_internals.package_working_dir(folder, tmp_path / "package.zip", include_gitignore=True)
    names = zipfile.ZipFile(tmp_path / "package.zip").namelist()
    assert "keep.py" in names and "big.bin" not in names


def test_the_replicas_grpc_binder_is_the_one_serve_calls_with_every_interface():
    """onray.serve binds each replica's inter-deployment gRPC server to loopback through this name; if a Ray release
    renames it or stops passing "[::]:0", the replica would listen on every interface again: this fails first."""
    import importlib

    module = importlib.import_module(ray_internals.REPLICA_GRPC_BINDER[0])
    assert callable(getattr(module, ray_internals.REPLICA_GRPC_BINDER[1]))
    assert f'{ray_internals.REPLICA_GRPC_BINDER[1]}(self._server, "[::]:0")' in inspect.getsource(module)
