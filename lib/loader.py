"""The plain PyTorch input pipeline: the no-Ray baseline that benchmarks compare Ray Data against.

It applies exactly the same batched transform (:func:`lib.augment.augment_batch`) as the Ray Data
pipeline in ``onray.data``, so a speed ratio between the two measures the plumbing, not the maths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from lib.augment import AugmentSettings, augment_batch, resize_batch
from lib.data.reader import PreparedData
from lib.devices import available_cpus


class BatchTransformDataset(Dataset):
    """In-memory images indexed by a *list* of positions: one call returns a whole transformed batch.

    ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) int64. Returns ``{"image": (B, 3, S, S) uint8,
    "label": (B,) int64}``: augmented when ``augment`` is true, else only resized. The consumer
    applies :func:`lib.augment.normalize` on its device, as with the Ray Data pipeline.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, settings: AugmentSettings, augment: bool = True):
        # a private, writable copy: Arrow-backed arrays are read-only, and forked workers share it
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8, order="C"))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.settings = settings
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        transformed = (augment_batch(images, self.settings) if self.augment
                       else resize_batch(images, self.settings.image_size))
        return {"image": transformed, "label": self.labels[index]}


def torch_loader(data_dir: str | os.PathLike, split: str = "train", batch_size: int = 128,
                 settings: AugmentSettings = AugmentSettings(), augment: bool = True, shuffle: bool = True,
                 num_workers: int | None = None, drop_last: bool = True) -> DataLoader:
    """A ``DataLoader`` over one prepared split, loaded into memory once, transformed per batch.

    ``num_workers`` defaults to the machine's cores. Batches are dicts like Ray's
    ``iter_torch_batches`` yields, so training code can take either.
    """
    arrays = PreparedData.open(data_dir).read_split(split)
    dataset = BatchTransformDataset(arrays.images, arrays.labels, settings, augment=augment)
    order = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    workers = available_cpus() if num_workers is None else num_workers
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=drop_last), batch_size=None,
                      num_workers=workers, persistent_workers=workers > 0)
