"""Where images come from: a labelled image folder, or CIFAR-10 in its official format.

A source is listed in the driver (cheap: names and labels only, no pixels) and validated there,
so bad input fails in a second with one line, before any cluster work starts. The pixels are
decoded later, in parallel, by :mod:`lib.dataset`'s batch functions running on Ray Data.

Identity of an image (its ``id``) is the relative path ``<split>/<class>/<file>`` for image folders
(the copy of CIFAR-10 in ``shared/datasets`` says to treat (split, class, file name) as identity)
and ``<split>/<index>`` for the official CIFAR-10 batches (the index in the official order).

Generic parts live here (:class:`Source`, :func:`parse_source`, :class:`Listing`,
:func:`list_source`); :mod:`lib.sources.imagefolder` lists image folders and
:mod:`lib.sources.cifar10` reads the official CIFAR-10 archive. The seeded, platform-independent
choice of items (:func:`stable_hash`, :func:`stratified_pick`) is here too: image folders, the
validation split and the per-class training subsets all use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.errors import UserError

SOURCE_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Source:
    """A parsed ``--source``: ``kind`` is ``"cifar10"`` or ``"imagefolder"``; ``path`` may be None for cifar10."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_source(text: str) -> Source:
    """Parse ``cifar10``, ``cifar10:DIR`` (extracted batches or the .tar.gz) or ``imagefolder:PATH``."""
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind == "cifar10":
        return Source("cifar10", Path(rest).expanduser().absolute() if rest else None)
    if kind == "imagefolder" and sep and rest:
        return Source("imagefolder", Path(rest).expanduser().absolute())
    raise UserError(f"unknown --source {text!r}: use cifar10, cifar10:PATH or imagefolder:PATH")


@dataclass
class Listing:
    """Everything known about a source before decoding.

    For an image folder, ``paths`` holds one file per image; for CIFAR-10 batches ``images`` holds the
    pixels already (N, 32, 32, 3) uint8. ``source_split[i]`` is ``"train"`` or ``"test"``.
    """

    classes: list[str]
    ids: list[str]
    labels: np.ndarray
    source_split: np.ndarray
    image_shape: tuple[int, int, int]
    paths: list[str] | None = None
    images: np.ndarray | None = None
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def stable_hash(seed: int, key: str) -> int:
    """A 64-bit hash of ``(seed, key)`` that is the same on every machine and Python run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def stratified_pick(ids: list[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Choose ``round(fraction * n_c)`` items of every class ``c``; returns a boolean mask.

    Within a class, items are ranked by :func:`stable_hash` of their id, so the choice depends only on
    the seed and the ids (not on listing order or platform), and adding files moves few others.
    Every class keeps at least one item on each side when it has two or more.
    """
    labels = np.asarray(labels)
    mask = np.zeros(len(ids), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(fraction * len(members)))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        ranked = sorted(members, key=lambda i: stable_hash(seed, ids[i]))
        mask[ranked[:take]] = True
    return mask


def list_source(source: Source, cache_dir: Path, test_fraction: float, seed: int) -> Listing:
    """List any source; downloads CIFAR-10 into ``cache_dir`` when no path is given."""
    # imported here: both modules import Listing from this package
    if source.kind == "imagefolder":
        from lib.sources.imagefolder import list_image_folder

        assert source.path is not None
        return list_image_folder(source.path, test_fraction=test_fraction, seed=seed)
    from lib.sources.cifar10 import download_cifar10, find_cifar10_batches, load_cifar10_batches

    batches = (find_cifar10_batches(source.path, cache_dir) if source.path is not None
               else download_cifar10(cache_dir))
    return load_cifar10_batches(batches)
