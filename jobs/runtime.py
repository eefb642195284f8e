"""What every job shares: starting or attaching to Ray, and turning bad input into exit code 2."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lib.config import parse_config
from lib.errors import EXIT_USER_ERROR, UserError

C = TypeVar("C")


def local_num_cpus() -> int:
    """Logical CPUs for a Ray this job starts itself.

    More than the machine's cores: Ray Train's workers hold their CPUs for the whole run, and Ray
    Data's read and map tasks must still be schedulable beside them, or the run waits forever
    (RAY_NOTES "The 2-core machine": ``num_cpus=2`` with two Train workers deadlocks).
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


def log(message: str) -> None:
    """A progress line for people watching the job (stderr keeps stdout for results).

    Written to the stream directly: inside Ray Train workers ``print`` is patched to tee into
    Train's logger as well, which would show every line twice.
    """
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def run_job(main: Callable[[C], Any], config_cls: type[C], argv: Sequence[str] | None, prog: str) -> int:
    """Parse ``argv`` into ``config_cls``, run ``main`` and map a :class:`UserError` to one line + exit 2."""
    try:
        config = parse_config(config_cls, argv, prog=prog)
        main(config)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
