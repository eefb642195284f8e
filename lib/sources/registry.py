"""The ``--source`` registry: every kind of source is one class registered under its name.

``--source KIND[:ARGUMENT]`` is split once, here, by :func:`parse_source`; the class registered as ``KIND``
parses ``ARGUMENT`` into a frozen dataclass (its typed spec), and that spec lists itself::

    @register_source("imagefolder")
    @dataclass(frozen=True)
    class ImageFolderSource(DataSource):
        location: Location
        forms = ("imagefolder:PATH",)

        @classmethod
        def parse(cls, argument): ...            # str | None -> ImageFolderSource (UserError when malformed)
        def list_images(self, options): ...      # -> Listing (names, labels, splits; no pixels decoded)
        def __str__(self): ...                   # the canonical text, recorded in the manifest

A :class:`Listing` either names files on a ``pyarrow.fs.FileSystem`` (decoded later, in parallel, by
:func:`lib.data.writer.write_shard_batch` through that filesystem object) or holds the pixels already.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pyarrow.fs as pafs

from lib.errors import UserError

# The splits a source provides; jobs.prepare carves val out of train.
SOURCE_SPLITS = ("train", "test")
KIND_NAME = re.compile(r"[a-z][a-z0-9_-]*")


# map_each(function, items) -> [function(item) for item in items], in order, possibly in parallel elsewhere.
MapEach = Callable[[Callable[[Any], Any], list], list]


def map_in_this_process(function: Callable[[Any], Any], items: list) -> list:
    """The default :data:`MapEach`: one item after another, here."""
    return [function(item) for item in items]


@dataclass(frozen=True)
class ListOptions:
    """What listing may depend on besides the source: ``cache_dir`` (downloads), and the seed and share of
    each class a source without its own test split uses as test.

    ``image_shape``: the (H, W, 3) the images will be stored at when the user chose it; a source then need
    not measure its files. ``map_each``: how a source runs many slow, independent reads (listing folders on
    object storage, reading headers): jobs.prepare passes one that runs them as Ray Data tasks. The function
    mapped must be picklable and return JSON-compatible values (lists, dicts, str, numbers).
    """

    cache_dir: Path
    test_fraction: float = 0.2
    seed: int = 0
    image_shape: tuple[int, int, int] | None = None
    map_each: MapEach = map_in_this_process


@dataclass
class Listing:
    """Everything known about a source before decoding: N images, in a stable order.

    ``ids`` (N,) unique str, ``labels`` (N,) int64 indexes into ``classes``, ``source_split`` (N,) object
    ``"train"`` or ``"test"``, ``image_shape`` (H, W, 3) every image is stored at. Exactly one of: ``files``
    (N,) paths on ``filesystem``, one image file each, or ``images`` (N, H, W, 3) uint8 already decoded.
    ``notes`` go into the manifest's ``source_notes`` (``layout`` is shown in the job's log).
    """

    classes: list[str]
    ids: list[str]
    labels: np.ndarray
    source_split: np.ndarray
    image_shape: tuple[int, int, int]
    files: list[str] | None = None
    filesystem: pafs.FileSystem | None = None
    images: np.ndarray | None = None
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.files is None) == (self.images is None):
            raise ValueError("a Listing holds either files or images")
        if self.files is not None and self.filesystem is None:
            raise ValueError("a Listing of files needs the filesystem they are on")

    def __len__(self) -> int:
        return len(self.ids)


class DataSource(ABC):
    """A parsed ``--source``: subclasses are frozen dataclasses registered with :func:`register_source`."""

    kind: ClassVar[str] = ""
    # how the kind is written on the command line, for help and error messages
    forms: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def parse(cls, argument: str | None) -> DataSource:
        """The spec for ``KIND:ARGUMENT`` (``argument`` None when the text has no ``:``); :class:`UserError`
        when the argument is malformed. Cheap and offline: files are looked at by :meth:`list_images`."""

    @abstractmethod
    def list_images(self, options: ListOptions) -> Listing:
        """Names, labels and splits of every image (no pixels decoded for files); :class:`UserError` for bad
        input (missing path, no images, one class only, ...)."""

    @abstractmethod
    def __str__(self) -> str:
        """The canonical ``--source`` text: ``parse_source(str(spec)) == spec``; the manifest records it."""


Kind = TypeVar("Kind", bound=type[DataSource])
_KINDS: dict[str, type[DataSource]] = {}


def register_source(name: str):
    """Class decorator: make ``--source NAME[:ARGUMENT]`` parse with this class. A name taken twice raises."""
    if not KIND_NAME.fullmatch(name):
        raise ValueError(f"source kind {name!r} must be lower-case letters, digits, '-' or '_'")

    def register(cls: Kind) -> Kind:
        if name in _KINDS:
            raise ValueError(f"source kind {name!r} is already registered ({_KINDS[name].__qualname__})")
        if not (isinstance(cls, type) and issubclass(cls, DataSource)):
            raise TypeError(f"source kind {name!r}: {cls!r} is not a DataSource subclass")
        if cls.__dict__.get("kind"):  # its kind names it in str() and messages: one class, one name
            raise ValueError(f"{cls.__qualname__} is already registered as source kind {cls.kind!r}")
        cls.kind = name
        _KINDS[name] = cls
        return cls

    return register


def source_kinds() -> dict[str, type[DataSource]]:
    """Registered kinds by name, sorted."""
    return dict(sorted(_KINDS.items()))


def source_forms() -> str:
    """Every registered way to write ``--source``: ``cifar10, cifar10:PATH or imagefolder:PATH``."""
    forms = [form for cls in source_kinds().values() for form in (cls.forms or (cls.kind,))]
    return ", ".join(forms[:-1]) + f" or {forms[-1]}" if len(forms) > 1 else "".join(forms)


def parse_source(text: str) -> DataSource:
    """``KIND[:ARGUMENT]`` -> the registered kind's spec; one-line :class:`UserError` for an unknown kind."""
    kind, sep, argument = text.partition(":")
    cls = _KINDS.get(kind.strip().lower())
    if cls is None:
        raise UserError(f"unknown --source {text!r}: the registered kinds are {', '.join(source_kinds())}; "
                        f"use {source_forms()}")
    return cls.parse(argument if sep else None)


def unregister_source(name: str) -> None:
    """Remove a registered kind (for tests that register a throwaway one)."""
    _KINDS.pop(name, None)
