"""Class-balanced P x K batches: every anchor in a batch has positives.

A random batch of 128 CIFAR-10 images nearly always holds every class several times, but with many
classes it would not. Batches here hold ``classes_per_batch`` (P) classes x ``samples_per_class`` (K)
images, the P x K sampling of metric learning. Rows are chosen by index with tensor operations (no
Python loop over rows), from a whole epoch's labels (:func:`epoch_batches`, the training device's path)
or from a stream of batches (:func:`balanced_batches`, the Ray Data path).

Both take the P classes with the most K-row groups left, ties broken at random: that yields the most
batches a set of class counts allows (:func:`max_batches`), so the LR schedule can count them in advance.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch


def batch_shape(batch_size: int, samples_per_class: int) -> tuple[int, int]:
    """(P, K): the classes and images per class of a P x K batch of at most ``batch_size`` rows."""
    if samples_per_class < 2:
        raise ValueError(f"samples_per_class must be >= 2, got {samples_per_class}")
    classes_per_batch = batch_size // samples_per_class
    if classes_per_batch < 2:
        raise ValueError(f"batch_size {batch_size} must hold at least 2 classes of {samples_per_class}")
    return classes_per_batch, samples_per_class


def max_batches(groups_per_class: Iterable[int], classes_per_batch: int) -> int:
    """The most batches of ``classes_per_batch`` distinct classes that ``groups_per_class`` (K-row groups of
    each class) can fill: the largest t with sum_c min(g_c, t) >= P * t (a class gives at most one group a batch)."""
    groups = np.asarray(list(groups_per_class), dtype=np.int64)
    low, high = 0, int(groups.sum()) // max(1, classes_per_batch)
    while low < high:  # the condition holds for every t up to the answer and for none above it
        t = (low + high + 1) // 2
        if np.minimum(groups, t).sum() >= classes_per_batch * t:
            low = t
        else:
            high = t - 1
    return low


def planned_steps(rows: int, num_classes: int, batch_size: int, samples_per_class: int) -> int:
    """Batches an epoch of ``rows`` rows spread evenly over ``num_classes`` classes yields: what the LR schedule
    counts. The full preset's batch 256 with 26 per class is 9 x 26 = 234 rows, so 45,000 rows give 192 steps,
    not 45,000 // 256 = 175."""
    classes_per_batch, k = batch_shape(batch_size, samples_per_class)
    per_class = rows // max(1, num_classes)
    return max_batches([per_class // k] * num_classes, classes_per_batch)


def _choose_classes(groups_left: np.ndarray, classes_per_batch: int, rng: np.random.Generator) -> np.ndarray | None:
    """Positions of the P entries of ``groups_left`` with the most groups left (random among equals); None
    when fewer than P have a group."""
    if np.count_nonzero(groups_left) < classes_per_batch:
        return None
    return np.argsort(-(groups_left + rng.random(len(groups_left))))[:classes_per_batch]


def epoch_batches(labels: torch.Tensor | np.ndarray, batch_size: int, samples_per_class: int,
                  seed: int | None = None) -> np.ndarray:
    """Row indices of one epoch's P x K batches over ``labels`` (N,): an (steps, P * K) int64 array.

    Each class's rows are shuffled and cut into groups of K; each batch takes one group from each of the P
    classes with the most groups left. ``steps`` is :func:`max_batches` of the group counts; rows that do not
    fill a group are left out, like ``drop_last``.
    """
    classes_per_batch, k = batch_shape(batch_size, samples_per_class)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # rows grouped by class, shuffled within it
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    groups = counts // k
    first_group = np.concatenate([[0], np.cumsum(groups)[:-1]])
    # all groups of all classes as rows of K indices, class by class
    group_rows = np.concatenate([order[s:s + g * k] for s, g in zip(starts, groups, strict=True)]
                                or [np.zeros(0, np.int64)]).reshape(-1, k)
    left, chosen_groups = groups.copy(), []
    while (chosen := _choose_classes(left, classes_per_batch, rng)) is not None:
        chosen_groups.append(first_group[chosen] + groups[chosen] - left[chosen])
        left[chosen] -= 1
    if not chosen_groups:
        return np.zeros((0, classes_per_batch * k), dtype=np.int64)
    return group_rows[np.stack(chosen_groups)].reshape(len(chosen_groups), -1).astype(np.int64)


def balanced_batches(stream: Iterable[dict[str, torch.Tensor]], batch_size: int, samples_per_class: int,
                     buffer_batches: int = 4, seed: int | None = None,
                     max_steps: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Re-batch ``stream`` (dicts with ``image`` and ``label``) into P x K class-balanced batches.

    Each output batch has ``batch_size // samples_per_class`` distinct classes with
    ``samples_per_class`` rows each (at least 2, so every anchor has a positive). Rows wait in a
    buffer of about ``buffer_batches * batch_size`` until their class can fill a slot; rows that
    cannot form a full batch at the end of the stream are dropped (like ``drop_last``), and so is
    a class that never reaches ``samples_per_class`` rows. At most ``max_steps`` batches are yielded.
    The buffer stays on the stream's device; batches are gathered from it by index.
    """
    classes_per_batch, k = batch_shape(batch_size, samples_per_class)
    rng = np.random.default_rng(seed)
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    label_list = np.zeros(0, dtype=np.int64)  # the buffer's labels on the host, for choosing (no device sync)
    yielded = 0

    def emit() -> dict[str, torch.Tensor] | None:
        nonlocal images, labels, label_list
        classes, counts = np.unique(label_list, return_counts=True)
        chosen = _choose_classes(counts // k, classes_per_batch, rng)
        if chosen is None:
            return None
        # the first K buffered rows of each chosen class: oldest first, so no row waits forever
        is_chosen = np.isin(label_list, classes[chosen])
        rank_in_class = np.zeros(len(label_list), dtype=np.int64)
        order = np.argsort(label_list, kind="stable")
        sorted_labels = label_list[order]
        starts = np.searchsorted(sorted_labels, sorted_labels)
        rank_in_class[order] = np.arange(len(order)) - starts
        take = is_chosen & (rank_in_class < k)
        rows = np.flatnonzero(take)
        rows = rows[np.argsort(label_list[rows], kind="stable")]  # grouped by class: K rows of each
        keep = torch.from_numpy(np.flatnonzero(~take)).to(labels.device)
        picked = torch.from_numpy(rows).to(labels.device)
        batch = {"image": images.index_select(0, picked), "label": labels.index_select(0, picked)}
        images, labels, label_list = images.index_select(0, keep), labels.index_select(0, keep), label_list[~take]
        return batch

    for batch in stream:
        incoming = batch["label"]
        images = batch["image"] if images is None else torch.cat([images, batch["image"]])
        labels = incoming if labels is None else torch.cat([labels, incoming])
        label_list = np.concatenate([label_list, incoming.cpu().numpy()])
        while len(label_list) >= buffer_batches * batch_size:
            if max_steps is not None and yielded >= max_steps:
                return
            out = emit()
            if out is None:
                break
            yielded += 1
            yield out
    while images is not None and (max_steps is None or yielded < max_steps) and (out := emit()) is not None:
        yielded += 1
        yield out
