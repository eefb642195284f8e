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

import bisect
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


def stream_order(unit_sizes: np.ndarray | list[int], rng: np.random.Generator) -> np.ndarray:
    """One epoch's order of the rows of units (contiguous runs of ``unit_sizes`` rows, in row order): the units in a
    random order, each unit's rows shuffled within it. (N,) int64 row indices: the order a streamed epoch can read."""
    sizes = np.asarray(unit_sizes, dtype=np.int64)
    unit_of_row = np.repeat(np.arange(len(sizes)), sizes)
    unit_rank = rng.permutation(len(sizes))[unit_of_row]  # where each row's unit comes in the epoch
    return np.lexsort((rng.random(len(unit_of_row)), unit_rank)).astype(np.int64)


def _paced_groups(chosen_classes: np.ndarray, group_positions: np.ndarray, first_group: np.ndarray,
                  groups: np.ndarray, rows: int) -> np.ndarray:
    """Which of its K-row groups each class takes at each step of ``chosen_classes`` (steps, P): the group whose
    place in the stream keeps pace with the epoch (at step t, the class's first group at or past t / steps of the
    ``rows``-long stream), held strictly increasing within the class and leaving room for its later turns.

    ``group_positions``: every group's place in the stream, class by class (the class's groups from
    ``first_group`` on, ascending); ``groups``: each class's group count. A streamed epoch then reads each unit
    about when its rows are due, for every class at once, however the classes' sizes and the units' mixes differ."""
    steps, per_step = chosen_classes.shape
    flat = chosen_classes.reshape(-1)
    order = np.argsort(flat, kind="stable")  # by class, then by step
    cls, step = flat[order], np.repeat(np.arange(steps), per_step)[order]
    turn = np.arange(len(cls)) - np.searchsorted(cls, cls)  # the class's how-manyth batch this is
    used = np.bincount(cls, minlength=len(groups))[cls]
    # one search over every class's groups: keys class * (rows + 1) + position ascend class by class
    class_of_group = np.repeat(np.arange(len(groups)), groups)
    keys = class_of_group * (rows + 1) + group_positions
    due = np.floor(rows * (step + 0.5) / steps).astype(np.int64)
    target = np.searchsorted(keys, cls * (rows + 1) + due) - first_group[cls] - turn
    # the running maximum within each class: offset the classes apart so that one accumulate does them all
    span = int(groups.max()) + int(used.max()) + 2
    paced = np.maximum.accumulate(target + cls * span) - cls * span
    picked = np.empty_like(flat)
    picked[order] = np.clip(paced, 0, groups[cls] - used) + turn
    return picked.reshape(steps, per_step)


def epoch_batches(labels: torch.Tensor | np.ndarray, batch_size: int, samples_per_class: int,
                  seed: int | None = None, unit_sizes: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Row indices of one epoch's P x K batches over ``labels`` (N,): an (steps, P * K) int64 array.

    Each class's rows are shuffled and cut into groups of K; each batch takes one group from each of the P
    classes with the most groups left. ``steps`` is :func:`max_batches` of the group counts; rows that do not
    fill a group are left out, like ``drop_last``.

    ``unit_sizes``: the rows come in units (Parquet row groups, ``sum(unit_sizes) == N``, in row order) that a
    streamed epoch reads one at a time. Then each class's rows are ordered as :func:`stream_order` reads them
    and each batch takes the group that keeps pace with the epoch (:func:`_paced_groups`), not the next one,
    so an epoch needs a unit only around one stretch of its steps: the units held at once do not grow with N.
    The batches depend on the labels, the units and the seed only, never on whether the rows are in memory.
    """
    classes_per_batch, k = batch_shape(batch_size, samples_per_class)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    rng = np.random.default_rng(seed)
    if unit_sizes is None:
        order = rng.permutation(len(labels))
    else:
        if int(np.sum(unit_sizes)) != len(labels):
            raise ValueError(f"unit_sizes add up to {int(np.sum(unit_sizes))} rows, labels has {len(labels)}")
        order = stream = stream_order(unit_sizes, rng)
    order = order[np.argsort(labels[order], kind="stable")]  # rows grouped by class, shuffled within it
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    groups = counts // k
    first_group = np.concatenate([[0], np.cumsum(groups)[:-1]])
    # all groups of all classes as rows of K indices, class by class
    group_rows = np.concatenate([order[s:s + g * k] for s, g in zip(starts, groups, strict=True)]
                                or [np.zeros(0, np.int64)]).reshape(-1, k)
    left, chosen_classes, next_groups = groups.copy(), [], []
    while (chosen := _choose_classes(left, classes_per_batch, rng)) is not None:
        chosen_classes.append(chosen)
        next_groups.append(groups[chosen] - left[chosen])  # each class's groups in turn
        left[chosen] -= 1
    if not chosen_classes:
        return np.zeros((0, classes_per_batch * k), dtype=np.int64)
    chosen_classes = np.stack(chosen_classes)  # (steps, P) class positions
    # each class's groups in turn, or (streamed units) the group that keeps pace with the epoch
    if unit_sizes is None:
        group_of_class = np.stack(next_groups)
    else:
        place_in_stream = np.empty(len(labels), dtype=np.int64)
        place_in_stream[stream] = np.arange(len(labels))
        group_of_class = _paced_groups(chosen_classes, place_in_stream[group_rows[:, -1]], first_group, groups,
                                       len(labels))
    chosen_groups = first_group[chosen_classes] + group_of_class
    return group_rows[chosen_groups].reshape(len(chosen_groups), -1).astype(np.int64)


def unit_lifetimes(batch_index: np.ndarray, unit_sizes: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """For each unit (contiguous runs of ``unit_sizes`` rows): the first and the last step of ``batch_index``
    (steps, B) that takes one of its rows; -1 for both when no step does. A streamed epoch reads a unit before
    its first step and lets it go after its last."""
    bounds = np.cumsum(np.asarray(unit_sizes, dtype=np.int64))
    steps = np.repeat(np.arange(len(batch_index)), batch_index.shape[1] if batch_index.ndim == 2 else 0)
    units = np.searchsorted(bounds, batch_index.reshape(-1), side="right")
    first = np.full(len(bounds), np.iinfo(np.int64).max)
    last = np.full(len(bounds), -1)
    np.minimum.at(first, units, steps)
    np.maximum.at(last, units, steps)
    first[last < 0] = -1
    return first, last


@dataclass(frozen=True)
class StreamLayout:
    """Where a streamed epoch keeps its units (:func:`stream_layout`): ``read_order``, the units it reads, in the
    order it needs them; ``first_step`` of each unit (-1: never read); ``slot`` (N,), each row's place in a
    buffer of ``capacity`` rows (-1: never read); a unit's rows keep their places from before its first step to
    after its last, and no two rows held at once share one."""

    read_order: np.ndarray
    first_step: np.ndarray
    slot: np.ndarray
    capacity: int


def stream_layout(batch_index: np.ndarray, unit_sizes: np.ndarray | list[int]) -> StreamLayout:
    """The :class:`StreamLayout` of one epoch's ``batch_index`` (steps, B) over rows in units of ``unit_sizes``:
    units read by first step, each given the lowest free run of buffer places that holds it (first fit), its
    places free again after its last step. The buffer's capacity is the most rows the epoch holds at once, give
    or take the gaps first fit leaves."""
    sizes = np.asarray(unit_sizes, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    first, last = unit_lifetimes(batch_index, sizes)
    used = np.flatnonzero(last >= 0)
    read_order = used[np.lexsort((used, first[used]))]
    free: list[list[int]] = [[0, 1 << 62]]  # [start, stop) runs of free places, ascending
    releases: list[tuple[int, int, int]] = []  # (step after which it frees, start, size), a heap
    slot_start = np.full(len(sizes), -1, dtype=np.int64)
    capacity = 0
    for unit in read_order:
        while releases and releases[0][0] < first[unit]:
            _, start, size = heapq.heappop(releases)
            _free_run(free, start, start + size)
        run = next(run for run in free if run[1] - run[0] >= sizes[unit])
        slot_start[unit] = run[0]
        run[0] += int(sizes[unit])
        capacity = max(capacity, int(slot_start[unit] + sizes[unit]))
        heapq.heappush(releases, (int(last[unit]), int(slot_start[unit]), int(sizes[unit])))
    slot = np.full(int(sizes.sum()), -1, dtype=np.int64)
    for unit in used:
        slot[starts[unit]:starts[unit] + sizes[unit]] = slot_start[unit] + np.arange(sizes[unit])
    return StreamLayout(read_order, first, slot, capacity)


def _free_run(free: list[list[int]], start: int, stop: int) -> None:
    """Give [start, stop) back to the ascending free runs, merged with its neighbours."""
    position = bisect.bisect_left(free, [start, stop])
    free.insert(position, [start, stop])
    if position + 1 < len(free) and free[position][1] == free[position + 1][0]:
        free[position][1] = free.pop(position + 1)[1]
    if position > 0 and free[position - 1][1] == free[position][0]:
        free[position - 1][1] = free.pop(position)[1]
    free[:] = [run for run in free if run[1] > run[0]]


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
