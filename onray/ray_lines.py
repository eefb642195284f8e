"""Ray's log-line formats: which lines of Ray's own logging are routine, which are errors, which are known to be
harmless. Pure text matching (no Ray import): :func:`lib.console.start` takes :func:`routine_ray_line` as its
classifier of lines for the log file only (``jobs.cli`` wires it), and :func:`onray.runtime.route_worker_lines`
uses :func:`ray_error_line` for what workers print.

The formats were read from Ray 2.60's output; a release that changes them makes Ray's lines reach the terminal
again (tests/unit/test_ray_lines.py pins one line of each).
"""

from __future__ import annotations

import re

# Lines Ray prints that say nothing a user can act on; each names why it is harmless.
HARMLESS = (
    # Ray Data's actor pools and Ray Train's PreemptionWatcher are actors with max_restarts > 0 whose constructor
    # arguments live in the object store; Ray logs this at ERROR level for every such actor it creates. It warns
    # that a restart could fail if the argument was evicted (ray-project/ray#53727); our jobs do not rely on
    # such restarts (a failed trainer is restarted whole by Ray Train's FailureConfig).
    re.compile(r"has constructor arguments in the object store and max_restarts > 0"),
    # The GCS logs at ERROR level when its KillActor RPC "fails", which is how it ends when the actor is already
    # gone (ray-project/ray#53412, #58544: the log was judged noise upstream and lowered in later releases).
    re.compile(r"Failed to kill actor .*KillActor RPC failed"),
    # Ray Data deprecation notice from inside Ray Train's own DatasetManager, not from our code.
    re.compile(r"RayDeprecationWarning: `ExecutionOptions.exclude_resources`"),
)
# Ray's Python log lines: "2026-11-30 01:01:15,260\tINFO worker.py:2029 -- ..."
RAY_PYTHON_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\S+:\d+ -- ")
# Ray's C++ log lines: "[2026-11-30 01:03:09,227 E 24462 24462] core_worker.cc:2465: ..."
RAY_CPP_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([DIWEF]) \d+ \d+\] ")
# Ray Serve's log lines (ray/serve/_private/logging_utils.py ServeFormatter: level, time, component, its id, then a
# request id and other fields where there are): "INFO 2026-12-03 17:41:02,517 serve 4100 -- Started Serve ..."
RAY_SERVE_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ \S+ (\S+ )*-- ")


def ray_level(line: str) -> str | None:
    """The first letter of a Ray log line's level (D, I, W, E, C or F), None for a line not from Ray's logging
    (Ray's Python and C++ logging, and Ray Serve's)."""
    match = RAY_PYTHON_LINE.match(line) or RAY_CPP_LINE.match(line) or RAY_SERVE_LINE.match(line)
    return match.group(1)[0] if match else None


def known_harmless(line: str) -> bool:
    """True for a line of :data:`HARMLESS`, whatever its level."""
    return any(pattern.search(line) for pattern in HARMLESS)


def routine_ray_line(line: str) -> bool:
    """True for a line of Ray's own logging at DEBUG, INFO or WARNING level, and for known-harmless lines."""
    return known_harmless(line) or (ray_level(line) or "") in ("D", "I", "W")


def ray_error_line(line: str) -> bool:
    """True for a line of Ray's logging at ERROR or FATAL level that is not known to be harmless."""
    return not known_harmless(line) and (ray_level(line) or "") in ("E", "C", "F")
