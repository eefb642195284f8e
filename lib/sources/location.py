"""Where a source's files are: a local path or a URI, opened through a ``pyarrow.fs.FileSystem``.

A :class:`Location` is what the user wrote (a local path made absolute, or a URI such as
``s3://bucket/prefix``), kept as text so a parsed ``--source`` compares, hashes and pickles as a string
and parsing never touches the network. :meth:`Location.resolve` turns it into a filesystem object and a
path on it (``pyarrow.fs.FileSystem.from_uri``: ``LocalFileSystem`` for local paths, S3, GCS, HDFS or
any filesystem pyarrow knows for URIs; other schemes through fsspec when it is installed and knows them);
listing and decoding use only that object, never ``open(path)``.

Object storage (S3 and S3-compatible servers) takes its settings from the standard AWS environment:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), ``AWS_ENDPOINT_URL`` for a server
that is not AWS, ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (or ``?region=`` on the URI). Keys found in the driver's environment are put
into the filesystem object itself, so the decode tasks (which receive that object, pickled) authenticate
the same way on any node, whatever their own environment holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from lib.errors import UserError

# Filesystems whose first path component is a bucket (each is missing from pyarrow builds without it).
OBJECT_STORES = tuple(kind for kind in (getattr(pafs, "S3FileSystem", None), getattr(pafs, "GcsFileSystem", None))
                      if kind is not None)
_S3 = getattr(pafs, "S3FileSystem", type(None))
# The environment variables an S3 filesystem reads its keys from (the AWS SDK's own names).
AWS_KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Other variables that point the AWS SDK at credentials; with none set and no credentials or config file,
# a refused request is worth a hint.
AWS_CREDENTIAL_VARIABLES = (*AWS_KEY_VARIABLES, "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                            "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


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
            filesystem, path = pafs.FileSystem.from_uri(self.text)
        except Exception as err:  # noqa: BLE001 - every failure to resolve is a bad --source
            opened = _open_with_fsspec(self.text) if self.is_uri else None
            if opened is None:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UserError(f"cannot open {self.text}: {reason}") from None
            return opened
        return with_driver_credentials(filesystem), path

    def __str__(self) -> str:
        return self.text


def _open_with_fsspec(uri: str) -> tuple[pafs.FileSystem, str] | None:
    """A scheme pyarrow does not know, through fsspec (when installed and it knows the scheme), else None."""
    try:
        import fsspec
        from fsspec.core import split_protocol
    except ImportError:
        return None
    scheme, _ = split_protocol(uri)
    try:
        implementation = fsspec.filesystem(scheme)
    except Exception as err:  # noqa: BLE001 - unknown scheme, or its package is not installed
        if isinstance(err, ImportError):  # fsspec knows the scheme, its package is missing: say which
            raise UserError(f"cannot open {uri}: {str(err).splitlines()[0]}") from None
        return None
    path = implementation._strip_protocol(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(implementation)), path


def with_driver_credentials(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem that carries the keys of this process's environment inside it (when set there).

    pyarrow pickles an S3 filesystem without keys it found in the environment: every process that unpickles it
    looks them up again in its own. Ray tasks on other nodes (or a local Ray started before the variables
    were set) would then go without them. Other filesystems are returned as they are.
    """
    if not isinstance(filesystem, _S3) or not all(os.environ.get(v) for v in AWS_KEY_VARIABLES):
        return filesystem
    _, (settings,) = filesystem.__reduce__()  # the options pyarrow resolved (endpoint, region, scheme, ...)
    if settings.get("access_key") or settings.get("anonymous") or settings.get("role_arn"):
        return filesystem  # keys, anonymous access or a role already set on the filesystem win
    settings = {**settings, "access_key": os.environ["AWS_ACCESS_KEY_ID"],
                "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                "session_token": os.environ.get("AWS_SESSION_TOKEN") or None}
    return _S3(**settings)


def credentials_hint(filesystem: pafs.FileSystem) -> str:
    """For a refused S3 request: what to set when neither the environment nor an AWS credentials or config file
    holds credentials, else ``""`` (an instance role is not looked for: the hint says "in the environment")."""
    if not isinstance(filesystem, _S3) or any(os.environ.get(v) for v in AWS_CREDENTIAL_VARIABLES):
        return ""
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
             os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
    if any(Path(file).expanduser().is_file() for file in files):
        return ""
    return ("; no AWS credentials in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and AWS_ENDPOINT_URL for an S3-compatible server)")


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
    the path on the underlying filesystem for a ``SubTreeFileSystem``, fsspec's URI for an fsspec filesystem,
    else ``<type>://<path>`` (``s3://b/k``)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    if isinstance(filesystem, pafs.SubTreeFileSystem):
        inner, base = path.strip("/"), filesystem.base_path.rstrip("/") or filesystem.base_path
        return file_uri(filesystem.base_fs, join(base, inner) if inner else base)
    if isinstance(filesystem, pafs.PyFileSystem) and isinstance(filesystem.handler, pafs.FSSpecHandler):
        return filesystem.handler.fs.unstrip_protocol(path)  # fsspec's own name: memory:///bucket/x, az://...
    return f"{filesystem.type_name}://{path}"
