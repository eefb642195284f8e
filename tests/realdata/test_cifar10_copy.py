"""Prepare the full CIFAR-10 image-folder copy (60,000 JPEGs) through Ray Data and check the counts."""

import pytest

from jobs import prepare
from lib.data.reader import read_manifest
from tests.conftest import cifar10_dir

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.skipif(not cifar10_dir().is_dir(), reason=f"CIFAR-10 copy not found at {cifar10_dir()}")
def test_prepare_full_cifar10_copy(ray_session, tmp_path):
    data = prepare.main(prepare.PrepareConfig(source=f"imagefolder:{cifar10_dir()}", data_dir=str(tmp_path / "d")))
    manifest = read_manifest(data)
    assert manifest["classes"] == CIFAR10_CLASSES
    assert manifest["totals"] == {"train": 45_000, "val": 5_000, "test": 10_000}
    for split, per_class in (("train", 4_500), ("val", 500), ("test", 1_000)):
        assert manifest["counts"][split] == {name: per_class for name in CIFAR10_CLASSES}
    assert manifest["skipped"] == [] and manifest["converted"]["resized"] == 0
    assert manifest["image_shape"] == [32, 32, 3]
