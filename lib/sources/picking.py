"""The seeded, platform-independent choice of items: a single image tree's test split, the validation
split and the per-class training subsets all rank items by :func:`stable_hash` of their id."""

from __future__ import annotations

import hashlib

import numpy as np


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
