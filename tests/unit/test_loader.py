import numpy as np
import torch

from lib.augment import AugmentSettings
from lib.loader import BatchTransformDataset


def test_batches_follow_indices_and_labels():
    images = np.stack([np.full((32, 32, 3), i, np.uint8) for i in range(10)])
    labels = np.arange(10) % 3
    data = BatchTransformDataset(images, labels, AugmentSettings(image_size=48), augment=False)
    batch = data[[4, 1, 7]]
    assert batch["image"].shape == (3, 3, 48, 48) and batch["image"].dtype == torch.uint8
    assert batch["label"].tolist() == [1, 1, 1]
    assert batch["image"][0].float().mean() == 4.0 and batch["image"][2].float().mean() == 7.0
    augmented = BatchTransformDataset(images, labels, AugmentSettings())[[0, 1]]
    assert augmented["image"].shape == (2, 3, 32, 32)
