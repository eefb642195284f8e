"""Starting or attaching to Ray, and the checks a cluster run needs before any work."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lib import console
from lib.console import log
from lib.devices import available_cpus
from lib.errors import EnvironmentProblem, UserError
from onray import ray_internals
from onray.ray_lines import ray_error_line
from onray.reaper import OWNER_VARIABLE, start_watchdog

# A local Ray that fails to start (its dashboard or GCS not up in time on a busy machine) is started again
# this many times in all, each time in a fresh temporary folder, after a pause that grows.
START_ATTEMPTS = 3
START_PAUSE_S = 3.0
# How long a node may take to read the storage check's token (a node that is still starting can be slow).
STORAGE_CHECK_TIMEOUT_S = 120


def local_num_cpus() -> int:
    """Logical CPUs for a Ray this job starts itself.

    More than the CPUs this process may use (:func:`lib.devices.available_cpus`: affinity and cgroup
    quota, not the host's core count): Ray Train's workers hold their CPUs for the whole run, and Ray
    Data's read and map tasks must still be schedulable beside them, or the run waits forever
    (measured on 2 cores: ``num_cpus=2`` with two Train workers deadlocks).
    """
    cores = available_cpus()
    return max(4, cores + 2)


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listen_on_loopback() -> None:
    """Make the local Ray this process starts listen on 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: Ray swaps a loopback address for the
    machine's routable one, and its GCS, raylet, agents and workers then listen on every interface.
    Ray has one switch that keeps a node on loopback, made for laptops (a macOS/Windows firewall prompt,
    ray-project/ray#18730): :data:`onray.ray_internals.LOOPBACK_SWITCH`, set by
    :func:`onray.ray_internals.hold_node_on_loopback`. A node on loopback cannot join or be joined by other
    machines, which is what a local run wants; a cluster run (``RAY_ADDRESS``) never comes here. :func:`init_ray`
    takes the variable out of the environment again once Ray is up, so a ``ray start`` this process runs later
    (a test's cluster) is not held to loopback. Checked by tests/integration/test_console.py, which lists a
    job's listening sockets.
    """
    ray_internals.hold_node_on_loopback()


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Attach to the cluster in ``RAY_ADDRESS``, or start a local Ray sized by :func:`local_num_cpus`.

    Does nothing when Ray is already initialised (tests share one session cluster). ``num_cpus`` and
    ``kwargs`` only apply to a local Ray: Ray refuses resource arguments when attaching.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = console.is_active() and not console.is_verbose()
    if console.is_active():
        log(f"log file: {console.open_log_file()}" + ("" if console.is_verbose() else
                                                       " (Ray's own lines go there; --verbose shows them here too)"))
    if quiet:
        # Our bars stand in for Ray Data's (theirs would be drawn into the log file); workers inherit this.
        os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    if on_cluster():
        # Inside `ray job submit` the supervisor sets RAY_ADDRESS; a bare init() attaches to it.
        ray.init(log_to_driver=kwargs.get("log_to_driver", True))
        interrupt_on_sigterm()
        if quiet:
            route_worker_lines()
        return
    started = time.perf_counter()
    listen_on_loopback()
    # Ray Train V2 watches its controller through the state API, which the dashboard serves; it
    # also shows progress at http://127.0.0.1:<port>.
    kwargs.setdefault("include_dashboard", True)
    if kwargs["include_dashboard"]:
        kwargs.setdefault("dashboard_port", free_local_port())
        # Without an address, Ray's state API (Train's placement-group cleaner asks it whether the
        # controller lives) looks for "the" Ray on this machine: with a second job's local Ray running it
        # finds the other one or fails ("Found multiple active Ray instances"), and the cleaner then frees
        # this run's workers. Every process of this Ray inherits this environment, so they all ask this
        # Ray's own dashboard.
        ray_internals.point_state_api_at(kwargs["dashboard_port"])
    num_cpus = num_cpus or local_num_cpus()
    # Every process of this Ray carries the watchdog's mark (inherited from this environment while it starts), so
    # the watchdog can end them all when this process ends, even by SIGKILL (onray.reaper).
    os.environ[OWNER_VARIABLE] = start_watchdog()
    try:
        start_local_ray(num_cpus, **kwargs)
    finally:
        ray_internals.release_loopback_switch()
        os.environ.pop(OWNER_VARIABLE, None)
    interrupt_on_sigterm()
    if quiet:
        route_worker_lines()
    console.detail(f"started a local Ray with {num_cpus} logical CPUs "
                   f"in {time.perf_counter() - started:.1f} s (set RAY_ADDRESS to use a cluster)")


def interrupt_on_sigterm() -> None:
    """SIGTERM (what ``ray job stop`` and ``kill`` send) ends the job like Ctrl-C: one "interrupted" line, exit 130,
    and the same cleanup (Ray's shutdown, a tune's record kept for its resume).

    Called after ``ray.init``, which sets two handlers: a Python one (``sys.exit(15)``: no line, exit 15) and then,
    underneath it, its core worker's C++ failure handler, which prints a signal dump and kills the process.
    Setting a Python handler afterwards replaces both; a handler the job set itself is put back the same way.
    Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    rays = current in (signal.SIG_DFL, None) or getattr(current, "__module__", "").startswith("ray.")
    signal.signal(signal.SIGTERM, _raise_interrupt if rays else current)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def route_worker_lines() -> None:
    """Send what Ray workers print (forwarded to this driver) to the log file, showing on the terminal only our
    own lines and Ray's error lines (:func:`onray.ray_lines.ray_error_line` decides).

    Ray's hook for those lines is not public API (:func:`onray.ray_internals.route_forwarded_worker_lines`): if a
    Ray release renames it, the lines keep going to the terminal as before (tests/unit/test_ray_internals.py
    notices). Messages the raylet pushes to the driver (a worker killed for memory, "N worker processes have
    been started...") come here too.
    """
    ray_internals.route_forwarded_worker_lines("cifar_embed_worker_lines", _worker_lines)


def _worker_lines(data: dict[str, Any]) -> None:
    who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
    for line in data.get("lines", ()):
        if console.OURS.match(line):
            console.show(line)
        elif data.get("pid") == "raylet" and not line.lstrip().startswith(("WARNING", "INFO")):
            console.show(f"(raylet) {line}")  # a pushed error (a worker lost, out of memory): people need it
        elif ray_error_line(line):
            console.show(f"{who} {line}")
        else:
            console.to_log_file(f"{who} {line}")


def start_local_ray(num_cpus: int, attempts: int = START_ATTEMPTS, **kwargs: Any) -> None:
    """``ray.init(address="local")``, again in a fresh temporary folder when a start fails; after the last
    attempt an :class:`EnvironmentProblem` says what failed, which log to read and what to try."""
    import ray

    temp_dir = None
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, **ray_internals.temp_dir_option(temp_dir), **kwargs)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises bare Exception, ConnectionError, RuntimeError here
            ray.shutdown()  # whatever half-started goes
            reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
            # Ray's own rule for its folder: RAY_TMPDIR, else /tmp (socket paths must stay short)
            logs = Path(temp_dir or Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray") / "session_latest" / "logs"
            if attempt == attempts:
                raise EnvironmentProblem(
                    f"could not start a local Ray in {attempts} attempts (last: {reason}); its logs are in {logs} "
                    f"(gcs_server.err, dashboard.log); try again with fewer jobs at once, or start one Ray for "
                    f"all of them with `ray start --head` and set RAY_ADDRESS=127.0.0.1:6379") from None
            log(f"starting a local Ray failed ({reason}); attempt {attempt + 1} of {attempts} in a fresh folder")
            time.sleep(START_PAUSE_S * attempt)
            temp_dir = tempfile.mkdtemp(prefix="ray-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))


def on_cluster() -> bool:
    """True when the jobs attach to a cluster (``RAY_ADDRESS``) rather than a Ray of their own."""
    return bool(os.environ.get("RAY_ADDRESS"))


def check_cluster_paths(**paths: str) -> None:
    """Under ``RAY_ADDRESS`` refuse relative paths (``run_dir="runs/r1"``): a submitted job runs in a temporary
    working directory on the head that is deleted when it ends, and other nodes do not see it at all."""
    if not on_cluster():
        return
    for flag, path in paths.items():
        if path and "://" not in path and not Path(path).expanduser().is_absolute():
            raise UserError(f"--{flag.replace('_', '-')} {path} is a relative path: on a Ray cluster (RAY_ADDRESS is "
                            f"set) the job runs in a temporary folder that is deleted when it ends; give an absolute "
                            f"path on storage every node sees, e.g. /mnt/shared/{Path(path).name}")


def check_shared_storage(*folders: str | os.PathLike) -> None:
    """Prove that every alive node sees ``folders`` as this driver does: a token file written here is read back
    by a zero-CPU task pinned to each node. One clear error names the node that does not see it (its files
    would go to a disk nobody reads). A single-node Ray has nothing to check."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    markers = []
    for folder in (f for f in folders if f and "://" not in str(f)):  # URIs (s3://) are every node's alike
        Path(folder).mkdir(parents=True, exist_ok=True)
        marker = Path(folder) / f".shared-storage-check-{token}"
        marker.write_text(token)
        markers.append(str(marker))
    read_back = ray.remote(num_cpus=0, max_retries=0)(_missing_marker)
    try:
        checks = {node_label(node): read_back.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote(markers, token) for node in nodes}
        for address, ref in checks.items():
            try:
                missing = ray.get(ref, timeout=STORAGE_CHECK_TIMEOUT_S)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as err:
                raise UserError(f"node {address} did not answer the shared-storage check ({type(err).__name__}); "
                                f"see `ray status`") from None
            if missing:
                raise UserError(f"node {address} does not see {Path(missing).parent} as this driver does: RUN, DATA "
                                f"and --storage must be on storage every node mounts at the same path "
                                f"(a shared file system such as /mnt/shared)")
    finally:
        for marker in markers:
            Path(marker).unlink(missing_ok=True)


def node_label(node: dict[str, Any]) -> str:
    """A node of ``ray.nodes()`` as a person finds it: its name (``ray start --node-name``, a pod's name on KubeRay)
    or address, and the start of its node id (nodes of one machine share an address)."""
    address = node.get("NodeManagerAddress", "?")
    name = node.get("NodeName") or address
    where = name if name == address else f"{name} at {address}"
    return f"{where} (node id {str(node.get('NodeID', ''))[:8]})"


def _missing_marker(markers: list[str], token: str) -> str | None:
    """The first marker file this node cannot read back with ``token`` in it, else None."""
    for marker in markers:
        try:
            if Path(marker).read_text() == token:
                continue
        except OSError:
            pass
        return marker
    return None
