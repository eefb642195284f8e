"""Ray Data inputs: prepared Parquet -> augmented training batches, and every split for embedding.

The stored pixels are read once and kept in Ray's object store (``materialize``); the random
augmentation is a lazy ``map_batches`` on top, so Ray Train re-executes it each epoch and every
epoch sees new views. Consumers call ``iter_torch_batches`` on the dataset or on their
``ray.train.get_dataset_shard`` and normalise on their device::

    for batch in shard.iter_torch_batches(batch_size=128, local_shuffle_buffer_size=1024):
        images = lib.augment.normalize(batch["image"].to(device))   # uint8 -> float32
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import ray

from lib.augment import AugmentSettings, augment_batch, resize_batch
from lib.data.reader import SPLITS, PreparedData, table_ids, table_images
from lib.data.units import RowGroup, read_unit
from lib.parquet import read_parquet

Shuffle = Literal["none", "blocks", "full"]
# Fewer, larger blocks cost less scheduling per epoch; this many per CPU still keeps every CPU busy
# (measured on 2 cores: 8 blocks ran an epoch ~20 % faster than 24 blocks).
BLOCKS_PER_CPU = 2
MIN_ROWS_PER_BLOCK = 256


def read_split_dataset(data: PreparedData, split: str, columns: tuple[str, ...] = ("image", "label")
                       ) -> ray.data.Dataset:
    """One prepared split as a Ray Dataset (files listed by the manifest, so a partial DATA fails)."""
    return ray.data.read_parquet(data.files(split)).select_columns(list(columns))


def _augment(batch: dict[str, np.ndarray], settings: AugmentSettings) -> dict[str, np.ndarray]:
    return {"image": augment_batch(batch["image"], settings).numpy(), "label": batch["label"]}


def _resize(batch: dict[str, np.ndarray], image_size: int | None) -> dict[str, np.ndarray]:
    return {"image": resize_batch(batch["image"], image_size).numpy(), "label": batch["label"]}


def default_num_blocks(rows: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(BLOCKS_PER_CPU * cpus, rows // MIN_ROWS_PER_BLOCK))


def augmented_dataset(data: PreparedData, split: str = "train", settings: AugmentSettings = AugmentSettings(),
                      shuffle: Shuffle = "blocks", augment: bool = True, num_blocks: int | None = None,
                      files: list[str] | None = None, stored: bool = False) -> ray.data.Dataset:
    """Rows ``{"image": (3, S, S) uint8, "label": int64}``, augmented afresh every epoch.

    ``stored=True`` leaves the images as stored, ``(H, W, 3)`` uint8 at the stored size, for a consumer that
    augments and resizes on its own device (``jobs.train --augment-on device``): 3 KB a CIFAR-10 image
    crosses the object store instead of 150 KB at 224 px.

    ``shuffle``: ``"blocks"`` reorders the cached blocks every epoch (cheap; pair it with
    ``iter_torch_batches(local_shuffle_buffer_size=...)``), ``"full"`` is an all-to-all
    ``random_shuffle`` every epoch, ``"none"`` keeps file order (evaluation).
    ``augment=False`` only resizes (to ``settings.image_size``), for validation and embedding.
    Each cached block is one map task per epoch; ``num_blocks`` defaults to two per cluster CPU.
    ``files``: read these Parquet files (a subset of the split written by :func:`lib.data.subsets.write_subset`) as
    they are, one block each, instead of the whole split repartitioned.
    """
    if files is None:
        base = read_split_dataset(data, split).repartition(num_blocks or default_num_blocks(data.rows(split)))
    else:
        base = ray.data.read_parquet(files, override_num_blocks=len(files)).select_columns(["image", "label"])
    base = base.materialize()
    if shuffle == "blocks":
        base = base.randomize_block_order()
    elif shuffle == "full":
        base = base.random_shuffle()
    if stored:
        return base
    transform, kwargs = (_augment, {"settings": settings}) if augment else (
        _resize, {"image_size": settings.image_size})
    return base.map_batches(transform, batch_size=None, batch_format="numpy", zero_copy_batch=True,
                            fn_kwargs=kwargs)


def read_prepared(data: PreparedData, readers: int = 1) -> ray.data.Dataset:
    """Every split of a prepared DATA as a Ray dataset of ``id``, ``image``, ``label``, ``split``: one block
    per Parquet file, read by at most ``readers`` tasks at a time.

    The files are known from the manifest, so there is no listing or metadata pass, and the ``split``
    column comes with the rows. Reading takes a fraction of the embedding's CPU: ``num_cpus=0.5`` says so,
    and, differing from the actors' request, keeps Ray Data from fusing it into the actor stage (which would
    bundle the one-row file entries into one task and stream nothing).
    """
    files = [{"split": split, "file": f} for split in SPLITS for f in data.files(split)]
    return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        _read_files, batch_size=1, batch_format="numpy", num_cpus=0.5,
        compute=ray.data.TaskPoolStrategy(size=max(1, readers)))


def _read_files(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    columns: dict[str, list[np.ndarray]] = {"id": [], "image": [], "label": [], "split": []}
    for split, path in zip(batch["split"], batch["file"], strict=True):
        table = read_parquet(str(path), columns=["id", "image", "label"])
        columns["id"].append(table_ids(table))
        columns["image"].append(table_images(table))
        columns["label"].append(table.column("label").to_numpy())
        columns["split"].append(np.full(len(table), str(split), dtype=object))
    return {key: np.concatenate(parts) for key, parts in columns.items()}


# Read tasks of a streamed epoch ask for this share of a CPU: reading a row group is a fraction of the work the
# training worker does with it, and a whole CPU each would queue them behind the Train workers on a small node.
UNIT_READ_CPUS = 0.25


def unit_dataset(units: list[RowGroup], order: list[int] | np.ndarray) -> ray.data.Dataset:
    """``units[i]`` for ``i`` in ``order``, read by Ray Data tasks and handed over in that order: blocks of
    ``{"unit": i, "image": (rows, H, W, 3) uint8 as stored, "label": int64}`` (a unit larger than a block comes
    as several, in row order). What a training worker reads its shard through, once (cached) or every epoch
    (streamed)."""
    items = [{"unit": int(i), **dict(zip(("file", "row_group", "start", "rows"), units[int(i)].as_list(),
                                         strict=True))} for i in order]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        _read_units, batch_size=1, batch_format="numpy", num_cpus=UNIT_READ_CPUS)
    dataset.context.execution_options.preserve_order = True  # the worker needs each unit when its plan says
    dataset.context.enable_progress_bars = False
    return dataset


def _read_units(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    columns: dict[str, list[np.ndarray]] = {"unit": [], "image": [], "label": []}
    for unit, *where in zip(batch["unit"], batch["file"], batch["row_group"], batch["start"], batch["rows"],
                            strict=True):
        images, labels = read_unit(RowGroup.from_list(where))
        columns["unit"].append(np.full(len(labels), int(unit), dtype=np.int64))
        columns["image"].append(images)
        columns["label"].append(labels)
    return {key: np.concatenate(parts) for key, parts in columns.items()}
