"""The Ray Data training input pipeline against the plain PyTorch loader, on tiny data."""

from collections import Counter

import numpy as np
import pytest
import torch

from jobs import prepare
from lib.augment import AugmentSettings, normalize, resize_batch
from lib.data.reader import PreparedData
from lib.loader import torch_loader
from onray import data as inputs

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.conftest import make_image_folder

    root = tmp_path_factory.mktemp("inputs")
    folder = make_image_folder(root / "images", train_per_class=20, test_per_class=4)
    return prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(root / "data")))


def epoch(dataset, batch_size=16):
    return list(dataset.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=32))


def test_every_epoch_covers_the_split_with_fresh_views(data_dir):
    dataset = inputs.augmented_dataset(PreparedData.open(data_dir), settings=AugmentSettings(image_size=40))
    first, second = epoch(dataset), epoch(dataset)
    train = PreparedData.open(data_dir).read_split("train")
    for batches in (first, second):
        labels = torch.cat([b["label"] for b in batches])
        assert Counter(labels.tolist()) == Counter(train.labels.tolist())  # every row once
        assert batches[0]["image"].dtype == torch.uint8 and batches[0]["image"].shape[1:] == (3, 40, 40)
    # same rows, new random views: per-label pixel sums differ between epochs
    sums = [sorted(torch.cat([b["image"] for b in e]).float().sum(dim=(1, 2, 3)).tolist()) for e in (first, second)]
    assert sums[0] != sums[1]
    # and normalisation on the consumer's side gives ImageNet-normalised floats
    images = normalize(first[0]["image"])
    assert images.dtype == torch.float32 and -3 < images.mean() < 3


def test_unaugmented_pipeline_equals_the_plain_transform(data_dir):
    dataset = inputs.augmented_dataset(PreparedData.open(data_dir), split="test", settings=AugmentSettings(image_size=48),
                                       shuffle="none", augment=False)
    rows = torch.cat([b["image"] for b in dataset.iter_torch_batches(batch_size=64)])
    test = PreparedData.open(data_dir).read_split("test")
    assert torch.equal(rows, resize_batch(test.images, 48))


def test_ray_and_torch_pipelines_agree_on_content(data_dir):
    settings = AugmentSettings()
    loader = torch_loader(data_dir, batch_size=10, settings=settings, num_workers=0)
    torch_batches = list(loader)
    ray_batches = epoch(inputs.augmented_dataset(PreparedData.open(data_dir), settings=settings), batch_size=10)
    assert torch_batches[0]["image"].shape == ray_batches[0]["image"].shape
    assert sum(len(b["label"]) for b in torch_batches) == 50  # 54 train rows, batches of 10, drop_last
    # the same transform: mean brightness per class agrees closely between the two pipelines
    def class_means(batches):
        images = torch.cat([b["image"] for b in batches]).float()
        labels = torch.cat([b["label"] for b in batches])
        return np.array([images[labels == c].mean(dim=(0, 2, 3)).numpy() for c in range(3)])
    assert np.abs(class_means(torch_batches) - class_means(ray_batches)).max() < 12
