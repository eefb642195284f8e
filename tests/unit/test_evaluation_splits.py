"""lib.evaluation over Splits: one model's SplitEmbeddings of train, val and test, compared and exported by name."""

import numpy as np
import pytest

from lib.embedding import SplitEmbeddings
from lib.errors import UserError
from lib.evaluation import Splits, check_aligned, export_blocks
from lib.paths import RunPaths


def splits_of(ids: dict[str, list[str]], dim: int = 3, seed: int = 0) -> Splits:
    rng = np.random.default_rng(seed)
    return Splits(**{split: SplitEmbeddings(np.asarray(rows, dtype=object), np.arange(len(rows)) % 2,
                                            rng.normal(size=(len(rows), dim)).astype(np.float32))
                     for split, rows in ids.items()})


IDS = {"train": ["a", "b", "c", "d"], "val": ["e", "f"], "test": ["g", "h", "i"]}


def test_models_over_the_same_rows_are_aligned_and_other_rows_are_named(tmp_path):
    run = RunPaths.of(tmp_path)
    check_aligned({"resnet50": splits_of(IDS), "vgg16": splits_of(IDS, dim=5, seed=1)}, run)
    shuffled = {**IDS, "val": ["f", "e"]}
    with pytest.raises(UserError, match="embeddings of vgg16 and resnet50 cover different val images"):
        check_aligned({"resnet50": splits_of(IDS), "vgg16": splits_of(shuffled)}, run)


def test_the_export_takes_a_seeded_subset_of_each_models_test_rows():
    model = splits_of(IDS)
    [(name, ids, labels, vectors)] = list(export_blocks({"resnet50": model}, limit=2, seed=0))
    assert name == "resnet50" and len(ids) == len(labels) == len(vectors) == 2
    for row_id, label, vector in zip(ids, labels, vectors, strict=True):
        row = list(model.test.ids).index(row_id)
        assert label == model.test.labels[row] and np.array_equal(vector, model.test.vectors[row])
    assert model.of("val") is model.val
