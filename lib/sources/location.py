"""Where a source's files are: a local path or a URI, opened through a ``pyarrow.fs.FileSystem``.

A :class:`Location` is what the user wrote (a local path made absolute, or a URI such as
``s3://bucket/prefix``), kept as text so a parsed ``--source`` compares, hashes and pickles as a string
and parsing never touches the network. :meth:`Location.resolve` turns it into a filesystem object and a
path on it (``pyarrow.fs.FileSystem.from_uri``: ``LocalFileSystem`` for local paths, S3, GCS, HDFS or
any filesystem pyarrow knows for URIs); listing and decoding use only that object, never ``open(path)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from lib.errors import UserError


@dataclass(frozen=True)
class Location:
    """A file or folder as the user named it: ``text`` is an absolute local path or a URI (``scheme://...``)."""

    text: str

    @property
    def is_uri(self) -> bool:
        return "://" in self.text

    def resolve(self) -> tuple[pafs.FileSystem, str]:
        """(the filesystem, the path on it); a :class:`UserError` naming the location when pyarrow cannot open it
        (an unknown scheme, a filesystem this pyarrow was built without, missing credentials)."""
        try:
            return pafs.FileSystem.from_uri(self.text)
        except Exception as err:  # noqa: BLE001 - every failure to resolve is a bad --source
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"cannot open {self.text}: {reason}") from None

    def __str__(self) -> str:
        return self.text


def parse_location(text: str) -> Location:
    """A URI as given (without a trailing ``/``), or a local path made absolute (``~`` expanded)."""
    text = text.strip()
    if "://" in text:
        scheme, _, rest = text.partition("://")
        return Location(f"{scheme.lower()}://{rest.rstrip('/')}")
    return Location(str(Path(text).expanduser().absolute()))


def join(path: str, *names: str) -> str:
    """``path/name/...`` on a pyarrow filesystem (always ``/``-separated)."""
    if not names:
        return path
    base = path.rstrip("/")
    if not base and not path.startswith("/"):  # the root of a filesystem whose paths are relative (a bucket's)
        return "/".join(names)
    return "/".join([base, *names])


def file_uri(filesystem: pafs.FileSystem, path: str) -> str:
    """How to name ``path`` on ``filesystem`` in a message or the manifest: the plain path for a local file,
    the path on the underlying filesystem for a ``SubTreeFileSystem``, else ``<type>://<path>`` (``s3://b/k``)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    if isinstance(filesystem, pafs.SubTreeFileSystem):
        inner, base = path.strip("/"), filesystem.base_path.rstrip("/") or filesystem.base_path
        return file_uri(filesystem.base_fs, join(base, inner) if inner else base)
    return f"{filesystem.type_name}://{path}"
