"""Near-duplicates across splits in pixel space: signatures ignore brightness, contrast and a one-pixel shift, and
tell different pictures apart."""

import numpy as np
import pytest

from lib.duplicates import DEFAULT_THRESHOLD, nearest_train, signatures


def scenes(n: int, seed: int) -> np.ndarray:
    """``n`` distinct 32 x 32 pictures: random 4 x 4 colour fields upsampled bilinearly (smooth, as real images are
    at this scale)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((32, 32), Image.BILINEAR)) for c in coarse])


def test_signatures_are_unit_vectors_blind_to_brightness_and_contrast():
    images = scenes(5, seed=0)
    base = signatures(images)
    assert base.shape == (5, 16 * 16 * 3) and base.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-5)
    brighter = np.clip(images.astype(np.float32) * 0.7 + 40, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(np.sum(signatures(brighter) * base, axis=1), 1.0, atol=1e-3)
    with pytest.raises(ValueError, match="smaller than"):
        signatures(np.zeros((1, 8, 8, 3), np.uint8))


def test_each_test_image_finds_its_altered_copy_and_nothing_else_passes():
    train = scenes(200, seed=1)
    picked = train[[7, 42, 99]]
    copies = np.concatenate([picked[:, :, :1], picked[:, :, :-1]], axis=2)  # shifted one pixel right
    copies = np.clip(copies.astype(np.int16) + 12, 0, 255).astype(np.uint8)  # and brighter
    others = scenes(20, seed=2)
    found = nearest_train(np.concatenate([copies, others]), train, chunk=7)
    assert found.train_rows[:3].tolist() == [7, 42, 99]
    assert found.duplicate.tolist() == [True] * 3 + [False] * 20
    assert found.count == 3 and found.share == pytest.approx(3 / 23)
    assert (found.similarity[:3] >= DEFAULT_THRESHOLD).all() and (found.similarity[3:] < DEFAULT_THRESHOLD).all()
