from collections import Counter

import pytest
import torch

from lib.batching import balanced_batches


def stream(labels, batch=10):
    images = torch.arange(len(labels)).view(-1, 1)  # the image is its row number
    for start in range(0, len(labels), batch):
        yield {"image": images[start:start + batch], "label": torch.tensor(labels[start:start + batch])}


def test_every_batch_is_p_classes_by_k_samples_without_repeats():
    labels = [i % 7 for i in range(700)]
    seen = []
    batches = list(balanced_batches(stream(labels), batch_size=12, samples_per_class=4, seed=0))
    for batch in batches:
        counts = Counter(batch["label"].tolist())
        assert len(counts) == 3 and set(counts.values()) == {4}
        rows = batch["image"].view(-1).tolist()
        assert all(labels[r] == label for r, label in zip(rows, batch["label"].tolist(), strict=True))
        seen.extend(rows)
    assert len(seen) == len(set(seen))  # no row twice
    assert len(seen) >= 700 - 7 * 4  # only leftovers that cannot fill a batch are dropped


def test_rare_classes_do_not_block_and_seed_repeats():
    labels = [0] * 40 + [1] * 40 + [2] * 1  # class 2 can never fill a slot
    first = [b["label"].tolist() for b in balanced_batches(stream(labels), 8, 4, seed=3)]
    again = [b["label"].tolist() for b in balanced_batches(stream(labels), 8, 4, seed=3)]
    assert first == again and len(first) == 10 and all(2 not in b for b in first)


def test_rejects_batches_without_positives():
    with pytest.raises(ValueError, match="samples_per_class must be >= 2"):
        list(balanced_batches(stream([0, 1]), 8, 1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        list(balanced_batches(stream([0, 1]), 8, 8))
