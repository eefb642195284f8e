"""Training rows past memory: --cache-budget sizes, P x K batches planned over row groups, and a streamed epoch
that gives the cached epoch's batches pixel for pixel from a buffer of a few row groups."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from lib.augment import AugmentSettings, fresh_generator
from lib.batching import epoch_batches, max_batches, stream_layout
from lib.config import parse_size
from lib.data.units import read_unit, read_unit_labels, row_groups, units_of_rank
from lib.data.writer import parquet_schema
from lib.errors import UserError
from lib.parquet import write_parquet
from lib.training import TrainConfig, augmented_batches, cache_budget_bytes, streamed_batches


@pytest.mark.parametrize("text, size", [("0", 0), ("512MB", 512 * 2**20), ("4GB", 4 * 2**30), ("1.5 gib", 3 * 2**29),
                                        ("100", 100), ("2k", 2048)])
def test_sizes_read_in_powers_of_1024(text, size):
    assert parse_size(text, "--cache-budget") == size


@pytest.mark.parametrize("text", ["lots", "-1GB", "4 GBs", "", "1e9", "2**30"])
def test_a_bad_cache_budget_is_one_line_naming_the_flag(tmp_path, text):
    with pytest.raises(UserError) as err:
        TrainConfig(data_dir=str(tmp_path), run_dir=str(tmp_path), cache_budget=text)
    assert str(err.value) == f"--cache-budget must be a size such as 512MB, 4GB or 0, got {text!r}"


def test_auto_budget_is_half_the_free_memory_shared_by_its_workers():
    assert cache_budget_bytes("auto", 8 * 2**30, sharing=2) == 2 * 2**30
    assert cache_budget_bytes("1GB", 8 * 2**30, sharing=2) == 2**30  # a size is the worker's own


def labels_of(layout: str, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, rows)
    return np.sort(labels) if layout == "class by class" else labels


@pytest.mark.parametrize("layout", ["mixed", "class by class"])
def test_batches_over_row_groups_are_p_by_k_and_need_few_groups_at_once_whatever_n(layout):
    held = []
    for rows in (40_000, 160_000):
        labels, sizes = labels_of(layout, rows), [2000] * (rows // 2000)
        index = epoch_batches(labels, 128, 16, seed=3, unit_sizes=sizes)
        assert np.array_equal(index, epoch_batches(labels, 128, 16, seed=3, unit_sizes=sizes))  # the seed decides
        assert len(np.unique(index)) == index.size  # no row twice
        per_class = labels[index].reshape(len(index), 8, 16)
        assert (per_class == per_class[..., :1]).all()  # 8 classes x 16 images
        assert all(len(set(batch[:, 0])) == 8 for batch in per_class)
        groups = np.bincount(labels, minlength=10) // 16
        assert len(index) == max_batches(groups, 8)  # as many batches as the class counts allow
        held.append(stream_layout(index, sizes).capacity / 2000)  # row groups' worth held at once
    # a few row groups when every group mixes the classes, about one a class when they come class by class,
    # and no more for four times the rows
    assert held[1] <= (8 if layout == "mixed" else 20) and held[1] <= held[0] + 4


def write_split(folder, rows: int, rows_per_group: int) -> list[str]:
    """A train split in jobs.prepare's schema, class by class (as an image folder prepares), 8 x 8 images that
    differ in every row; two files of several row groups."""
    rng = np.random.default_rng(1)
    labels = np.sort(rng.integers(0, 4, rows))
    images = rng.integers(0, 256, (rows, 8, 8, 3), dtype=np.uint8)
    files = []
    for part, rows_of_part in enumerate(np.array_split(np.arange(rows), 2)):
        table = pa.table({"id": pa.array([f"r{i}" for i in rows_of_part]),
                          "image": pa.FixedShapeTensorArray.from_numpy_ndarray(images[rows_of_part]),
                          "label": pa.array(labels[rows_of_part], pa.int64()),
                          "label_name": pa.array([f"c{label}" for label in labels[rows_of_part]])},
                         schema=parquet_schema((8, 8, 3)))
        files.append(str(folder / f"part-{part}.parquet"))
        write_parquet(table, files[-1], row_group_size=rows_per_group)
    return files


@pytest.mark.parametrize("rank", [0, 1])
def test_a_streamed_epoch_gives_the_cached_epochs_batches_pixel_for_pixel(tmp_path, rank):
    units = units_of_rank(row_groups(write_split(tmp_path, 2400, 25), workers=2), rank, world=2)
    sizes, labels = [unit.rows for unit in units], read_unit_labels(units)
    index = epoch_batches(labels, 16, 4, seed=7, unit_sizes=sizes)
    settings = AugmentSettings(image_size=16)
    cached_images = torch.from_numpy(np.concatenate([read_unit(unit)[0] for unit in units]))
    cached = list(augmented_batches(cached_images, torch.from_numpy(labels), index, settings, fresh_generator(7)))

    layout = stream_layout(index, sizes)
    read = []

    def arriving():  # what the worker gets from Ray Data: whole units, in the layout's order
        for unit in layout.read_order:
            read.append(int(unit))
            yield int(unit), torch.from_numpy(read_unit(units[unit])[0].copy())

    streamed = list(streamed_batches(index, labels, sizes, layout, arriving(), (8, 8, 3), settings,
                                     fresh_generator(7), torch.device("cpu")))
    assert len(streamed) == len(cached) == len(index) > 10
    for ours, theirs in zip(streamed, cached, strict=True):
        assert torch.equal(ours["label"], theirs["label"]) and torch.equal(ours["image"], theirs["image"])
    assert sorted(read) == list(range(len(units)))  # each row group read once
    assert layout.capacity <= len(labels) // 2  # never the whole shard at once
