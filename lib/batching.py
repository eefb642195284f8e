"""Class-balanced batches from a stream: every anchor in a batch has positives.

Ray Data streams rows in (locally shuffled) random order; a random batch of 128 CIFAR-10 images
nearly always holds every class several times, but with many classes it would not. This re-batcher
keeps a buffer of incoming rows and emits batches of ``classes_per_batch`` classes x
``samples_per_class`` images (the P x K sampling of metric learning), drawn at random from the buffer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch


def balanced_batches(stream: Iterable[dict[str, torch.Tensor]], batch_size: int, samples_per_class: int,
                     buffer_batches: int = 4, seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Re-batch ``stream`` (dicts with ``image`` and ``label``) into P x K class-balanced batches.

    Each output batch has ``batch_size // samples_per_class`` distinct classes with
    ``samples_per_class`` rows each (at least 2, so every anchor has a positive). Rows wait in a
    buffer of about ``buffer_batches * batch_size`` until their class can fill a slot; rows that
    cannot form a full batch at the end of the stream are dropped (like ``drop_last``), and so is
    a class that never reaches ``samples_per_class`` rows.
    """
    if samples_per_class < 2:
        raise ValueError(f"samples_per_class must be >= 2, got {samples_per_class}")
    classes_per_batch = batch_size // samples_per_class
    if classes_per_batch < 2:
        raise ValueError(f"batch_size {batch_size} must hold at least 2 classes of {samples_per_class}")
    rng = np.random.default_rng(seed)
    pools: dict[int, deque] = {}
    buffered = 0

    def ready_classes() -> list[int]:
        return [label for label, pool in pools.items() if len(pool) >= samples_per_class]

    def emit(chosen: list[int]) -> dict[str, torch.Tensor]:
        nonlocal buffered
        rows = [pools[label].popleft() for label in chosen for _ in range(samples_per_class)]
        buffered -= len(rows)
        return {"image": torch.stack([row[0] for row in rows]),
                "label": torch.tensor([row[1] for row in rows], dtype=torch.long)}

    for batch in stream:
        images, labels = batch["image"], batch["label"]
        for image, label in zip(images, labels.tolist(), strict=True):
            pools.setdefault(label, deque()).append((image, label))
        buffered += len(labels)
        while buffered >= buffer_batches * batch_size:
            ready = ready_classes()
            if len(ready) < classes_per_batch:
                break
            yield emit(list(rng.choice(ready, size=classes_per_batch, replace=False)))
    while len(ready := ready_classes()) >= classes_per_batch:
        yield emit(list(rng.choice(ready, size=classes_per_batch, replace=False)))
