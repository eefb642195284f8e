import numpy as np
import pytest
import torch

from lib.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSettings,
    augment_batch,
    fresh_generator,
    normalize,
    resize_batch,
)


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)  # > one internal chunk


def test_shapes_and_dtype(images):
    out = augment_batch(images)
    assert out.shape == (300, 3, 32, 32) and out.dtype == torch.uint8
    assert augment_batch(images, AugmentSettings(image_size=64)).shape == (300, 3, 64, 64)
    assert augment_batch(images, AugmentSettings(image_size=16)).shape == (300, 3, 16, 16)
    assert resize_batch(images, 224).shape == (300, 3, 224, 224)


def test_identity_warp_reproduces_the_image(images):
    still = AugmentSettings(max_shift=0.0, max_rotation_degrees=0.0, min_zoom=1.0, horizontal_flip=False)
    assert torch.equal(augment_batch(images, still), torch.from_numpy(images).permute(0, 3, 1, 2))


def test_flip_only_mirrors(images):
    flip = AugmentSettings(max_shift=0.0, max_rotation_degrees=0.0, min_zoom=1.0, horizontal_flip=True)
    out = augment_batch(images, flip, fresh_generator(1))
    original = torch.from_numpy(images).permute(0, 3, 1, 2)
    mirrored = original.flip(-1)
    is_same = (out == original).flatten(1).all(1)
    is_mirror = (out == mirrored).flatten(1).all(1)
    assert bool((is_same | is_mirror).all()) and 0.3 < is_mirror.float().mean() < 0.7


def test_every_call_draws_new_views_and_seed_repeats(images):
    first, second = augment_batch(images), augment_batch(images)
    assert not torch.equal(first, second)
    assert torch.equal(augment_batch(images, generator=fresh_generator(5)),
                       augment_batch(images, generator=fresh_generator(5)))


def test_warp_moves_content_within_the_promised_ranges():
    # a centred bright square: a shift of <= 4 source px per axis, seen through a zoom >= 0.8, moves
    # its centroid <= 4*sqrt(2)/0.8 px; the zoom grows its area by at most 1/0.8^2
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 12:20, 12:20] = 255
    out = augment_batch(np.repeat(image, 200, 0))[:, 0].float() / 255
    mass = out.sum(dim=(1, 2))
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cy, cx = (out * ys).sum(dim=(1, 2)) / mass, (out * xs).sum(dim=(1, 2)) / mass
    offset = torch.hypot(cy - 15.5, cx - 15.5)
    assert offset.max() <= 4 * 2 ** 0.5 / 0.8 + 0.5 and offset.max() > 1.0
    assert (mass / 64).min() > 0.9 and (mass / 64).max() < 1 / 0.64 + 0.1


def test_normalize_matches_imagenet_statistics():
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(batch)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.dtype == torch.float32 and torch.allclose(out[0, :, 0, 0], expected)
    assert torch.allclose(normalize(batch.float() / 255), out)
