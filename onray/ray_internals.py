"""Every private Ray API and internal Ray switch the project relies on, in one place: a Ray upgrade reads this file.

Each item says what it is, why the project needs it and what it falls back to; all were checked against the
installed Ray 2.60.0 source (``site-packages/ray``). tests/unit/test_ray_internals.py asserts that each one
still exists in the installed Ray, so an upgrade that renames one fails there first, by name. Callers in
:mod:`onray` and :mod:`tuning` (and the tests) import from here, never from ``ray._private`` directly.

Ray is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# --- Environment switches -------------------------------------------------------------------------------------

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (ray/_private/ray_constants.py, read into ENABLE_RAY_CLUSTER when a process
# imports Ray; ray/_private/services.py then answers 127.0.0.1 for the node IP): "0" makes a node's IP 127.0.0.1
# in every process Ray starts, and Ray's servers bind to the node IP. Ray's only way to keep a local node on loopback (ray-project/ray#18730); see
# :func:`hold_node_on_loopback`.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# RAY_API_SERVER_ADDRESS (ray/_private/ray_constants.py, read by ray/dashboard/utils.py when the state API looks
# for its server): the dashboard the state API asks. Without it the state API
# looks for "the" Ray on this machine and finds another job's, or fails with "Found multiple active Ray
# instances"; Ray Train's placement-group cleaner asks it whether its controller lives.
STATE_API_ADDRESS_SWITCH = "RAY_API_SERVER_ADDRESS"

# The name of the stock handler of forwarded worker lines on the driver (ray/_private/worker.py,
# ``global_worker_stdstream_dispatcher.add_handler("ray_print_logs", ...)``).
STOCK_WORKER_LINE_HANDLER = "ray_print_logs"


def hold_node_on_loopback() -> None:
    """Make the local Ray this process starts next listen on 127.0.0.1 only.

    Sets :data:`LOOPBACK_SWITCH` to "0" for the processes Ray starts (they inherit this environment) and
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, the copy this process read when it imported Ray.
    ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: Ray swaps a loopback address for the
    machine's routable one. Undo the environment part with :func:`release_loopback_switch`.
    """
    from ray._private import ray_constants

    os.environ[LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def release_loopback_switch() -> None:
    """Take :data:`LOOPBACK_SWITCH` out of the environment (a ``ray start`` run later is not held to loopback)."""
    os.environ.pop(LOOPBACK_SWITCH, None)


def point_state_api_at(dashboard_port: int) -> None:
    """Make every process of the local Ray this process starts ask its own dashboard for Ray's state
    (:data:`STATE_API_ADDRESS_SWITCH`)."""
    os.environ[STATE_API_ADDRESS_SWITCH] = f"http://127.0.0.1:{dashboard_port}"


# --- ray.init -------------------------------------------------------------------------------------------------

def temp_dir_option(temp_dir: str | None) -> dict[str, str]:
    """``ray.init``'s keyword for the folder of a local Ray's session (sockets, logs): ``_temp_dir``, underscored
    (ray/_private/worker.py ``init(..., **kwargs)``). A start that failed in one folder is retried in a fresh
    one. {} for Ray's default folder."""
    return {"_temp_dir": temp_dir} if temp_dir else {}


def session_dir() -> str:
    """The session folder of the Ray this process is attached to (``ray._private.worker._global_node``).
    Tests find that Ray's processes by it."""
    from ray._private import worker

    return worker._global_node.get_session_dir_path()


# --- Lines that workers print, forwarded to the driver --------------------------------------------------------

def route_forwarded_worker_lines(name: str, handler: Callable[[dict[str, Any]], None]) -> bool:
    """Hand what Ray workers print (forwarded to this driver) to ``handler`` instead of Ray's printer.

    ``ray._private.worker.global_worker_stdstream_dispatcher`` calls its handlers with each batch of forwarded
    lines (a dict: ``lines``, ``pid``, ``actor_name``, ``task_name``); the stock one
    (:data:`STOCK_WORKER_LINE_HANDLER`) prints them all. Messages the raylet pushes to the driver (a worker
    killed for memory) skip the dispatcher: Ray's error listener prints them with
    ``ray._private.worker.print_to_stdstream``, replaced here as well. Returns False, changing nothing, when
    this Ray has no such dispatcher: the lines then reach the terminal as before.
    """
    from ray._private import worker

    dispatcher = getattr(worker, "global_worker_stdstream_dispatcher", None)
    if dispatcher is None or not hasattr(dispatcher, "remove_handler"):
        return False
    dispatcher.remove_handler(STOCK_WORKER_LINE_HANDLER)
    dispatcher.add_handler(name, handler)
    if callable(getattr(worker, "print_to_stdstream", None)):
        worker.print_to_stdstream = lambda data, ignore_prefix=False: handler(data)
    return True


# --- Ray Serve's replicas ---------------------------------------------------------------------------------------

# The module and function Ray Serve's replica binds its inter-deployment gRPC server with: ``ReplicaBase.
# _on_initialized`` calls ``add_port_to_grpc_server(self._server, "[::]:0")`` (ray/serve/_private/replica.py), every
# interface whatever the node's address, and no setting or variable changes that address.
REPLICA_GRPC_BINDER = ("ray.serve._private.replica", "add_port_to_grpc_server")


def bind_replica_grpc_to_loopback() -> bool:
    """In a Serve replica on a node that listens on loopback only (a local Ray, :func:`hold_node_on_loopback`),
    make the replica's inter-deployment gRPC server listen on the node's address too, not on every interface.

    Call it in the replica before Serve starts that server (the deployment's ``__init__`` runs first). Callers
    reach the server at the node's address (``RunningReplicaInfo.node_ip``), so binding there changes nothing for
    them. Returns True when it took effect; False, changing nothing, on a node with a routable address (a cluster:
    other nodes' proxies call in) or when this Ray has no such function.
    """
    import importlib
    import ipaddress

    import ray

    node_ip = ray.util.get_node_ip_address()
    module = importlib.import_module(REPLICA_GRPC_BINDER[0])
    original = getattr(module, REPLICA_GRPC_BINDER[1], None)
    if not ipaddress.ip_address(node_ip).is_loopback or not callable(original):
        return False
    if getattr(original, "binds_node_ip", False):
        return True

    def bind_on_node_ip(server, address: str):
        host, _, port = address.rpartition(":")
        return original(server, f"{node_ip}:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    bind_on_node_ip.binds_node_ip = True
    setattr(module, REPLICA_GRPC_BINDER[1], bind_on_node_ip)
    return True


# --- The cluster's state --------------------------------------------------------------------------------------

def cluster_config_node_groups() -> list[dict[str, Any]]:
    """The node types of the cluster config Ray's GCS holds (``ray._private.state.state.get_cluster_config()``,
    the reading Ray Train and Ray Data make; a platform publishes it with ``ReportClusterConfig``): one dict per
    node group, ``name``, ``resources`` ({"CPU": 8, "GPU": 1}), ``min_count`` and ``max_count`` (-1: no limit).
    [] when nothing is published (OSS Ray's launcher and KubeRay do not publish it in 2.60), or when this Ray
    lacks the call."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it the caller has other sources
        return []
    if config is None:
        return []
    return [{"name": group.name, "resources": dict(group.resources), "min_count": int(group.min_count),
             "max_count": int(group.max_count)} for group in config.node_group_configs]


def placement_groups() -> list[Any] | None:
    """Every placement group the GCS knows, as ``ray.core.generated.gcs_pb2.PlacementGroupTableData`` records
    (``state``, ``creator_actor_id``, ``creator_actor_dead``, ``creator_job_id``, ``is_detached``,
    ``placement_group_id``; ``type(record).REMOVED`` is the removed state).

    Read from ``ray._private.state.state._connect_and_get_accessor().get_placement_group_table()``: the public
    ``ray.util.placement_group_table()`` leaves out the creator actor, which is how a stopped Tune trial's
    leftover groups are told apart. None when this Ray's table cannot be read.
    """
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        table = state._connect_and_get_accessor().get_placement_group_table()
        return [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in table]
    except Exception:  # noqa: BLE001 - a private table: if a Ray release changes it, the caller does without
        return None


# --- Offline checks the tests make ----------------------------------------------------------------------------

def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """The cluster launcher's own check of a ``cluster.yaml`` (``ray.autoscaler._private.util.prepare_config``
    and ``validate_config``, what ``ray up`` runs), offline; raises ``jsonschema``'s ``ValidationError``.
    Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def package_working_dir(folder: str | os.PathLike, package: str | os.PathLike, include_gitignore: bool) -> None:
    """Zip ``folder`` into ``package`` as ``ray job submit --working-dir`` uploads it
    (``ray._private.runtime_env.packaging._zip_files``: ``.gitignore`` honoured when ``include_gitignore``,
    ``.rayignore`` always)."""
    from ray._private.runtime_env.packaging import _zip_files

    _zip_files(str(folder), [], str(Path(package)), include_gitignore=include_gitignore)
