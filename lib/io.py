"""Atomic file output: a crash never leaves a file or folder that looks complete.

Files are written under a temporary name in the destination folder and renamed into place
(``os.replace`` is atomic within one file system). Folders are built under a temporary name
and renamed the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lib.errors import UserError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed and check we can create files in it.

    Raises :class:`UserError` naming the path when it is a file, cannot be created or is read-only.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"output path is a file, not a folder: {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {path}: {err.strerror or err}") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to; renamed to ``path`` when the block succeeds.

    For writers that take a file name (pyarrow, faiss, ``shutil.copyfile``). On an exception the
    temporary file is removed and ``path`` keeps its previous content. The temporary name is unique,
    so two processes writing the same file never share one.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` on success (see :func:`atomic_path`)."""
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy ``source`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as pretty JSON to ``path`` atomically; returns the path."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`UserError` naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON: {path} (line {err.lineno}: {err.msg})") from None


def staging_dir(parent: str | os.PathLike, name: str) -> Path:
    """A fresh, empty temporary folder inside ``parent`` whose name starts with ``.name.``."""
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))


def replace_dir(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the finished folder ``staged`` to ``final``, replacing what ``final`` held.

    The old ``final`` is first renamed aside, then removed only after the new one is in place,
    so a crash leaves either the old or the new folder under ``final`` (plus a hidden leftover).
    """
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
