"""The errors a user sees as one line, and their exit codes.

Job entry points (``jobs.cli.run_job``) turn each into a single line on stderr, never a traceback:

- :class:`UserError`, exit code 2: bad input the user can fix (a path, a flag, a file). A full,
  over-quota or read-only disk is one too (:func:`disk_error` makes it).
- :class:`EnvironmentProblem`, exit code 3: the machine or the cluster failed, not the input.
- :class:`WorkFailed`, exit code 1: the work ran but part of it failed (a backbone, every trial of a tune).

Programming errors propagate as ordinary exceptions. :func:`failure_reason` says in one line why
a failure (a Ray error with its causes) happened.
"""

from __future__ import annotations

import errno

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT = 3
# A full, over-quota or read-only disk: the user's to fix, never a bug to retry.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class UserError(Exception):
    """Bad input that the user can fix. ``str(err)`` is the whole message, one line."""

    def __init__(self, message: str):
        # Keep the promise of one line even when a caught exception's text spans several.
        super().__init__(" ".join(str(message).split()))


class EnvironmentProblem(Exception):
    """The machine or the cluster failed, not the input (a local Ray that would not start): exit code 3.
    ``str(err)`` is the whole message, one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class WorkFailed(Exception):
    """The work ran but part of it failed (exit code 1); what did finish stands. ``str(err)`` is one line.
    Defined here, without Ray, so that a job's entry point knows it before it imports the Ray side."""


def disk_error(err: BaseException) -> UserError | None:
    """A one-line :class:`UserError` for a full, over-quota or read-only disk (``err`` or its cause), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            where = f" writing {err.filename}" if err.filename else ""
            return UserError(f"{err.strerror or err}{where}: free some space (or make it writable) and rerun; "
                             f"finished work is kept and reruns resume")
        err = err.__cause__ or getattr(err, "cause", None)
    return None


def failure_reason(err: BaseException) -> str:
    """One line saying why ``err`` happened: its type, and the last line of its innermost cause's message
    (a Ray error's first line is only "Training failed due to worker errors:")."""
    seen = set()
    while id(err) not in seen and (err.__cause__ or getattr(err, "cause", None)) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.cause
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"
