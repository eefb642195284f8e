"""Near-duplicates across splits, in pixel space: test images whose nearest train image is (almost) the same picture.

CIFAR-10's test split has near-duplicates of train images (Barz and Denzler, "Do we train on test data? Purging
CIFAR of near-duplicates", 2020: 3.3 % of its test images), and protocol G (test queries against the train gallery)
rewards finding them, which says nothing about the embedding. The check here is model-free, so it finds the same
pairs for every model and for any labelled folder:

1. every image becomes a *signature*: shrunk to ``side`` x ``side`` pixels (box filter), each colour channel
   centred on the image's mean and the whole vector scaled to unit length. Shrinking tolerates the small shifts,
   crops and re-encodings that make a near-duplicate; centring and scaling tolerate brightness and contrast
   changes; what is left compares the layout of the picture;
2. each test signature's nearest train signature by cosine similarity (exact search);
3. a pair is a near-duplicate when that similarity is at least ``threshold`` (default
   :data:`DEFAULT_THRESHOLD`, read off the CIFAR-10 copy's distribution: see ``docs/results.md``).

Returns arrays; the evaluation writes ``RUN/eval/near_duplicates.parquet`` and draws the closest pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_SIDE = 16
DEFAULT_THRESHOLD = 0.95


def signatures(images: np.ndarray, side: int = DEFAULT_SIDE) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, side * side * 3) float32 unit vectors (see the module docstring); H and W must be
    multiples of ``side`` (CIFAR's 32 px and ``side`` 16, 8 or 32) or larger than it (then cropped to a multiple)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    n, height, width, _ = images.shape
    if height < side or width < side:
        raise ValueError(f"images of {height}x{width} are smaller than the signature side {side}")
    fy, fx = height // side, width // side
    cropped = images[:, :fy * side, :fx * side].astype(np.float32)
    shrunk = cropped.reshape(n, side, fy, side, fx, 3).mean(axis=(2, 4))
    centred = shrunk - shrunk.mean(axis=(1, 2), keepdims=True)
    flat = centred.reshape(n, -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return np.ascontiguousarray(flat / np.maximum(norms, 1e-6), dtype=np.float32)


@dataclass(frozen=True)
class NearestTrain:
    """For each test image: its nearest train image (``train_rows`` into the train arrays) and their cosine
    ``similarity`` in signature space; ``duplicate`` where that similarity reaches the threshold."""

    train_rows: np.ndarray
    similarity: np.ndarray
    duplicate: np.ndarray
    threshold: float

    @property
    def count(self) -> int:
        return int(self.duplicate.sum())

    @property
    def share(self) -> float:
        return self.count / max(1, len(self.duplicate))


def nearest_train(test_images: np.ndarray, train_images: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                  side: int = DEFAULT_SIDE, chunk: int = 4096) -> NearestTrain:
    """Each test image's nearest train image in signature space (exact, chunked matrix products)."""
    from lib.retrieval.torch_search import torch_knn

    train = signatures(train_images, side)
    similarity, rows = [], []
    for start in range(0, len(test_images), chunk):
        sims, idx = torch_knn(signatures(test_images[start:start + chunk], side), train, 1)
        similarity.append(sims[:, 0])
        rows.append(idx[:, 0])
    similarity = np.concatenate(similarity) if similarity else np.zeros(0, np.float32)
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return NearestTrain(train_rows=rows, similarity=similarity, duplicate=similarity >= threshold,
                        threshold=threshold)
