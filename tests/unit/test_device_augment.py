"""The training device's augmentation (jobs.train --augment-on device) against Ray Data's (--augment-on data):
the same transform, so the same shapes, dtype, resize and ranges, whichever side runs it."""

import numpy as np
import pytest
import torch

from lib.augment import AugmentSettings, fresh_generator, resize_batch
from lib.batching import epoch_batches
from lib.training import augmented_batches
from onray.data import _augment, _resize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def centred_squares(n: int) -> np.ndarray:
    image = np.zeros((n, 32, 32, 3), np.uint8)
    image[:, 12:20, 12:20] = 255
    return image


def centroid_offsets_and_areas(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of (N, 3, S, S) uint8: how far the bright square's centroid moved from the centre (in px of a
    32 px image) and its area relative to the original 8 x 8."""
    size = images.shape[-1]
    out = images[:, 0].float().cpu() / 255
    mass = out.sum(dim=(1, 2))
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    cy, cx = (out * ys).sum(dim=(1, 2)) / mass, (out * xs).sum(dim=(1, 2)) / mass
    scale = 32 / size
    centre = (size - 1) / 2
    return torch.hypot(cy - centre, cx - centre) * scale, mass * scale ** 2 / 64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("image_size", [None, 64])
def test_device_and_ray_data_augmentation_draw_from_the_same_ranges(device, image_size):
    settings = AugmentSettings(image_size=image_size)
    stored = centred_squares(400)
    labels = np.repeat(np.arange(10), 40)
    ray_side = torch.from_numpy(_augment({"image": stored, "label": labels}, settings)["image"])
    index = epoch_batches(labels, 400, 40, seed=0)
    device_side = next(augmented_batches(torch.from_numpy(stored).to(device), torch.from_numpy(labels).to(device),
                                         index, settings, fresh_generator(1, device)))
    size = image_size or 32
    assert ray_side.shape == device_side["image"].shape == (400, 3, size, size)
    assert ray_side.dtype == device_side["image"].dtype == torch.uint8
    assert device_side["image"].device.type == device
    for images in (ray_side, device_side["image"]):
        offset, area = centroid_offsets_and_areas(images)
        # shift <= 4 px per axis seen through a zoom >= 0.8; area grows by at most 1 / 0.8^2
        assert offset.max() <= 4 * 2 ** 0.5 / 0.8 + 0.5 and offset.mean() > 1.0
        assert area.min() > 0.9 and area.max() < 1 / 0.64 + 0.15
    ray_offset, device_offset = centroid_offsets_and_areas(ray_side)[0], centroid_offsets_and_areas(device_side["image"])[0]
    assert abs(float(ray_offset.mean() - device_offset.mean())) < 0.15 * float(ray_offset.mean())


def test_same_generator_same_views_on_the_cpu():
    """On the CPU the two paths are one function: with one seed they produce the very same pixels."""
    settings = AugmentSettings(image_size=48)
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 100)
    index = epoch_batches(labels, 300, 100, seed=0)
    device_side = next(augmented_batches(torch.from_numpy(stored), torch.from_numpy(labels), index, settings,
                                         fresh_generator(7)))
    from lib.augment import augment_batch

    expected = augment_batch(stored[index[0]], settings, fresh_generator(7))
    assert torch.equal(device_side["image"], expected)
    assert torch.equal(device_side["label"], torch.from_numpy(labels[index[0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_val_images_resized_on_the_device_equal_ray_data_resize(device):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    for size in (32, 64, 224):
        ray_side = torch.from_numpy(_resize({"image": stored, "label": np.zeros(20)}, size)["image"])
        device_side = resize_batch(torch.from_numpy(stored).to(device), size).cpu()
        assert ray_side.dtype == device_side.dtype == torch.uint8 and ray_side.shape == device_side.shape
        # bilinear upsampling on another device may round a few pixels the other way
        assert (ray_side.int() - device_side.int()).abs().max() <= (0 if device == "cpu" else 1)
