"""Starting or attaching to Ray."""

from __future__ import annotations

import os
import time
from typing import Any

from lib.console import log


def local_num_cpus() -> int:
    """Logical CPUs for a Ray this job starts itself.

    More than the machine's cores: Ray Train's workers hold their CPUs for the whole run, and Ray
    Data's read and map tasks must still be schedulable beside them, or the run waits forever
    (measured on 2 cores: ``num_cpus=2`` with two Train workers deadlocks).
    """
    cores = os.cpu_count() or 1
    return max(4, cores + 2)


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Attach to the cluster in ``RAY_ADDRESS``, or start a local Ray sized by :func:`local_num_cpus`.

    Does nothing when Ray is already initialised (tests share one session cluster). ``num_cpus`` and
    ``kwargs`` only apply to a local Ray: Ray refuses resource arguments when attaching.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the supervisor sets RAY_ADDRESS; a bare init() attaches to it.
        ray.init(log_to_driver=kwargs.get("log_to_driver", True))
        return
    started = time.perf_counter()
    # Ray Train V2 watches its controller through the state API, which the dashboard serves; it
    # also shows progress at http://127.0.0.1:8265.
    kwargs.setdefault("include_dashboard", True)
    ray.init(address="local", num_cpus=num_cpus or local_num_cpus(), **kwargs)
    log(f"started a local Ray with {num_cpus or local_num_cpus()} logical CPUs "
        f"in {time.perf_counter() - started:.1f} s (set RAY_ADDRESS to use a cluster)")


def on_cluster() -> bool:
    """True when the jobs attach to a cluster (``RAY_ADDRESS``) rather than a Ray of their own."""
    return bool(os.environ.get("RAY_ADDRESS"))
