"""A local Ray dies with the job that started it, however the job ends (SIGKILL and the OOM killer included).

Ray ties its node processes to the driver only in part: ``ray.init`` starts the GCS and the raylet so that they
die with the driver (``PR_SET_PDEATHSIG``), but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive a SIGKILLed driver, re-parented to PID 1 and holding their ports (measured with
Ray 2.60: still there after 90 s). So a job that starts a local Ray first starts this watchdog, a small process
of its own session that holds nothing but the read end of a pipe whose write end only the driver holds. It marks
the Ray it is about to start: every process of that Ray inherits :data:`OWNER_VARIABLE` from the driver's
environment (the raylet passes it to its workers and agents). When the pipe closes, or the driver's process is
gone, the watchdog ends that Ray's processes: the driver's children that carry the mark and everything under
them (noted every second while the driver lives), and any process that carries the mark; SIGTERM, then SIGKILL
after a grace period.

Processes of another Ray (another job's, a cluster the job attached to) carry no mark and are never touched.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import uuid
from typing import Any

OWNER_VARIABLE = "CIFAR_EMBED_RAY_OWNER"
GRACE_S = 5.0
POLL_S = 1.0

_watchdog: subprocess.Popen | None = None  # kept for the driver's life: its stdin is the pipe's write end


def start_watchdog() -> str:
    """Start the watchdog for a local Ray this process is about to start; returns the mark to put into the
    environment of that Ray (``os.environ[OWNER_VARIABLE]`` while ``ray.init`` runs)."""
    global _watchdog
    import psutil

    mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    me = psutil.Process()
    env = {key: value for key, value in os.environ.items() if key != OWNER_VARIABLE}
    # Its own session: a Ctrl-C in the terminal goes to the job, not to the one process that must outlive it.
    _watchdog = subprocess.Popen([sys.executable, "-m", "onray.reaper", mark, str(me.pid), repr(me.create_time())],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=env, start_new_session=True, close_fds=True)
    return mark


def _driver_alive(pid: int, created: float) -> bool:
    import psutil

    try:
        return psutil.Process(pid).create_time() == created  # a reused PID is another process
    except psutil.Error:
        return False


def _environment(process: Any) -> dict[str, str]:
    """The process's environment as ``/proc`` shows it (empty when it cannot be read)."""
    import psutil

    try:
        return process.environ()
    except (psutil.Error, OSError):
        return {}


def ray_processes(driver: Any, mark: str) -> dict[int, float]:
    """PID -> start time of the driver's Ray: its children that carry ``mark`` (the GCS, the raylet, the dashboard)
    and all their descendants. Descendants are found by parentage, not by the mark: the agents rename their
    process (``ray::DashboardAgent``), which overwrites the environment that ``/proc`` shows."""
    import psutil

    found = {}
    try:
        children = driver.children()
    except psutil.Error:
        return found
    for child in children:
        if _environment(child).get(OWNER_VARIABLE) != mark:
            continue
        with contextlib.suppress(psutil.Error):
            for process in (child, *child.children(recursive=True)):
                found[process.pid] = process.create_time()
    return found


def end_processes(known: dict[int, float], mark: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM the processes in ``known`` that still run (the same PID and start time) and every process whose
    environment carries ``mark`` (a worker started after the last look); SIGKILL those left after ``grace_s``.
    Returns their PIDs."""
    import psutil

    targets = {}
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if known.get(process.pid) == process.create_time() or _environment(process).get(OWNER_VARIABLE) == mark:
                targets[process.pid] = process
    for process in targets.values():
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(targets.values()), timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return sorted(targets)


def watch(mark: str, driver_pid: int, driver_created: float) -> None:
    """Wait until the driver is gone (its pipe closed, or its process no longer there), then end its Ray.

    While the driver lives, the Ray processes under it are noted every :data:`POLL_S` seconds: once it is gone,
    its orphans are children of PID 1 and only these notes say which are its Ray's."""
    import psutil

    stdin = sys.stdin.buffer
    known: dict[int, float] = {}
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        driver = None
    while driver is not None and _driver_alive(driver_pid, driver_created):
        known.update(ray_processes(driver, mark))
        readable, _, _ = select.select([stdin], [], [], POLL_S)
        if readable and not os.read(stdin.fileno(), 4096):
            break  # EOF: the driver's end of the pipe closed
    # Twice: a process started while the first round ran (a worker the raylet was starting) is caught by the second.
    for _ in range(2):
        if not end_processes(known, mark):
            break


if __name__ == "__main__":
    watch(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
