"""What a person watching a job sees: our lines and progress bars on the terminal, everything else in a log file.

Inactive (the default, e.g. inside tests or Ray workers), :func:`log` writes one timestamped line to stderr and
:class:`Progress` prints a plain line now and then. A job's command line (``jobs.cli.run_job``) calls
:func:`start`, and from then on, unless ``--verbose``:

- file descriptor 2 is a pipe read by a thread: every line written there (Ray's Python loggers, Ray's C++
  logging, warnings) goes to the job's log file, and to the terminal unless the classifier given to
  :func:`start` calls it a line for the log file only (the Ray layer's :func:`onray.ray_lines.routine_ray_line`:
  this module knows nothing of Ray's formats);
- our own lines, the progress bars and the final error line go to the terminal directly (a copy of the
  original stderr), and to the log file as well.

The log file is created at :func:`open_log_file` (called when Ray starts, i.e. once the input has been
checked): a bad input creates no file. Until then lines are kept in memory.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

# How often a progress line is printed when stderr is not a terminal (CI logs, `ray job logs`).
PLAIN_PROGRESS_EVERY_S = 30.0

# The marker line _drain writes to fd 2 to learn that the reader has caught up (never shown or logged).
_SYNC = "\x00console-sync "
# Our own lines, also when a Ray worker prints them: "[01:03:00] densenet121: ..."
OURS = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def show_everything(line: str) -> bool:
    """The classifier :func:`start` uses when given none: no line of fd 2 is for the log file only."""
    return False


class _Console:
    def __init__(self) -> None:
        self.active = False
        self.verbose = False
        self.terminal: TextIO = sys.stderr
        self.log_path: Path | None = None
        self.log_file: TextIO | None = None
        self.pending: list[str] = []
        self.lock = threading.RLock()
        self.bars = 0  # open tqdm bars: lines must go through tqdm.write so a bar is not torn
        self.reader: threading.Thread | None = None
        self.synced = threading.Condition()
        self.marker = self.seen = 0  # the last marker written to fd 2 by _drain, and the last one the reader met
        self.log_only: Callable[[str], bool] = show_everything  # start()'s classifier of fd 2's lines


_console = _Console()


def terminal() -> TextIO:
    """The stream people read: the original stderr, also while fd 2 goes to the log filter."""
    return _console.terminal if _console.active else sys.stderr


def is_active() -> bool:
    return _console.active


def is_verbose() -> bool:
    return _console.verbose


def log_path() -> Path | None:
    """The job's log file (None before :func:`open_log_file` or when the console is inactive)."""
    return _console.log_path if _console.log_file else None


def to_log_file(line: str) -> None:
    """Append one line to the log file (kept in memory until it is opened)."""
    line = line.rstrip("\n")
    with _console.lock:
        if _console.log_file is not None:
            # a full disk loses the line from the log file, never the job (nor the thread that drains stderr)
            with contextlib.suppress(OSError):
                _console.log_file.write(line + "\n")
                _console.log_file.flush()
        elif _console.active:
            _console.pending.append(line)


def _to_terminal(line: str) -> None:
    """One line on the terminal, through tqdm while bars are open so a bar is not torn."""
    with _console.lock:
        if _console.bars:
            from tqdm import tqdm

            tqdm.write(line, file=terminal())
        else:
            stream = terminal()
            stream.write(line + "\n")
            stream.flush()


def show(line: str) -> None:
    """One line on the terminal and in the log file."""
    line = line.rstrip("\n")
    _to_terminal(line)
    to_log_file(line)


def log(message: str) -> None:
    """One timestamped progress line for people.

    Written to the stream directly: inside Ray Train workers ``print`` is patched to tee into
    Train's logger as well, which would show every line twice.
    """
    show(f"[{time.strftime('%H:%M:%S')}] {message}")


def detail(message: str) -> None:
    """A timestamped line for the log file only (on the terminal too with ``--verbose`` or when inactive)."""
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    if _console.active and not _console.verbose:
        to_log_file(line)
    else:
        show(line)


def error(line: str) -> None:
    """The job's final error line: on the terminal after anything still in the pipe, and in the log."""
    _drain()
    show(line)
    if log_path() is not None:
        to_log_file(f"(log file: {log_path()})")


def default_log_dir() -> Path:
    """Where a job without a RUN folder keeps its log: the temporary folder (``TMPDIR``)."""
    return Path(tempfile.gettempdir()) / "cifar-embed-logs"


def start(stage: str, log_dir: str | os.PathLike | None, verbose: bool = False,
          log_only: Callable[[str], bool] = show_everything) -> None:
    """Route this process's console for a job ``stage`` (see the module doc). ``log_dir``: the job's
    ``RUN/logs`` or None for :func:`default_log_dir`. ``log_only(line)``: True for a line written to fd 2
    that belongs in the log file only (its indented continuation lines follow it there); the Ray layer
    gives :func:`onray.ray_lines.routine_ray_line`. Called once, by the command-line entry point."""
    if _console.active:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    _console.log_path = Path(log_dir or default_log_dir()).expanduser().absolute() / f"{stage}-{stamp}-{os.getpid()}.log"
    _console.verbose = verbose
    _console.log_only = log_only
    _console.active = True
    if verbose:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    _console.terminal = io.TextIOWrapper(io.FileIO(saved, "w", closefd=True), encoding="utf-8",
                                         errors="backslashreplace", line_buffering=True)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    _console.reader = threading.Thread(target=_filter_native_stderr, args=(read_end,), name="console-stderr",
                                       daemon=True)
    _console.reader.start()
    atexit.register(_drain)


def use_log_dir(log_dir: str | os.PathLike) -> None:
    """Keep the log in ``log_dir`` (the job's ``RUN/logs``, known once its flags are parsed) instead of the default."""
    if _console.active and _console.log_file is None:
        _console.log_path = Path(log_dir).expanduser().absolute() / _console.log_path.name


def open_log_file() -> Path | None:
    """Create the log file (the input has passed its checks: the job is starting work) and write what was kept.
    A folder that cannot take it (read-only, say: the job itself will say so) leaves it in the default one."""
    if not _console.active or _console.log_file is not None:
        return log_path()
    for folder in (_console.log_path.parent, default_log_dir()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / _console.log_path.name, "a", encoding="utf-8",  # noqa: SIM115
                          errors="backslashreplace")
            break
        except OSError:
            continue
    else:
        return None
    with _console.lock:
        _console.log_path = folder / _console.log_path.name
        _console.log_file = handle
        for line in _console.pending:
            _console.log_file.write(line + "\n")
        _console.pending.clear()
        _console.log_file.flush()
    return _console.log_path


def _filter_native_stderr(fd: int) -> None:
    hiding = False  # inside a hidden multi-line message: its indented (or blank) continuation lines are hidden too
    with open(fd, encoding="utf-8", errors="backslashreplace") as pipe:
        for line in pipe:
            line = line.rstrip("\n")
            if line.startswith(_SYNC):
                with _console.synced:
                    _console.seen = int(line[len(_SYNC):])
                    _console.synced.notify_all()
                continue
            if _console.log_only(line):
                hiding = True
            elif not (hiding and (not line.strip() or line[0].isspace())):
                hiding = False
                _to_terminal(line)
            to_log_file(line)


def _drain(timeout: float = 2.0) -> None:
    """Wait until everything written to fd 2 so far has been through the filter: a marker line is written after
    it and the reader says when it got there."""
    if _console.reader is None or not _console.reader.is_alive():
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    with _console.synced:
        _console.marker += 1
        marker = _console.marker
        try:
            os.write(2, f"{_SYNC}{marker}\n".encode())
        except OSError:
            return
        _console.synced.wait_for(lambda: _console.seen >= marker, timeout=timeout)


class Progress:
    """A progress bar on a terminal (tqdm: count, rate, time left), plain lines every
    :data:`PLAIN_PROGRESS_EVERY_S` seconds otherwise (CI logs, a Ray job's log), and a closing line either way.

    ``position`` stacks several bars (one per backbone); ``unit`` names what is counted.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "img", position: int | None = None,
                 initial: int = 0) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.initial = initial  # ``initial``: already done before (a resumed run), not in the rate
        self.started = self.last_line = time.perf_counter()
        self.postfix = ""
        self.bar = None
        stream = terminal()
        if _console.active and stream.isatty() and not os.environ.get("CIFAR_EMBED_NO_BARS"):
            from tqdm import tqdm

            with _console.lock:
                try:
                    width = os.get_terminal_size(stream.fileno()).columns
                except (OSError, ValueError, io.UnsupportedOperation):
                    width = 0
                # a terminal that reports no width (a pseudo-terminal nobody sized) gets 100 columns, not none
                sizing = {"dynamic_ncols": True} if width else {"ncols": 100}
                self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=stream, position=position,
                                leave=True, smoothing=0.1, initial=initial, **sizing)
                _console.bars += 1

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc, refresh=False)

    def update(self, done: int, postfix: str = "") -> None:
        """Move to ``done`` items (absolute, so a reporter that skips updates loses nothing)."""
        self.postfix = postfix or self.postfix
        if self.bar is not None:
            with _console.lock:
                if postfix:
                    self.bar.set_postfix_str(postfix, refresh=False)
                self.bar.update(max(0, done - self.done))
        self.done = done
        if self.bar is None and time.perf_counter() - self.last_line >= PLAIN_PROGRESS_EVERY_S:
            self.last_line = time.perf_counter()
            log(self.summary())

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        left = (f", about {(self.total - self.done) / rate:.0f} s left"
                if self.total and rate > 0 and self.done < self.total else "")
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.done}{of} {self.unit} ({rate:,.1f} {self.unit}/s{left}{extra})"

    def close(self, message: str | None = None) -> None:
        """End the bar; ``message`` (if any) is logged as its last word."""
        if self.bar is not None:
            with _console.lock:
                self.bar.close()
                _console.bars -= 1
            self.bar = None
            to_log_file(self.summary())
        if message:
            log(message)
