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


def test_the_report_line_names_the_count_and_protocol_g_with_and_without():
    from lib.report import near_duplicates_note

    metrics = {"models": {"a": {"G": {"map@5": 0.5}, "G_without_near_duplicates": {"map@5": 0.4}},
                          "b": {"G": {"map@5": 0.3}}}}
    line = near_duplicates_note(metrics, 139, 10000, 0.95)
    assert line.startswith("Near-duplicates: 139 of 10000 test images (1.39 %)")
    assert line.endswith("Protocol G without them, mAP@5 (with them): a 0.400 (0.500).")
    assert "Protocol G" not in near_duplicates_note({"models": {"b": {"G": {"map@5": 0.3}}}}, 0, 10, 0.95)


def test_the_picture_shows_each_pair_with_its_similarity():
    from lib.plots import near_duplicates_figure

    images = scenes(3, seed=4)
    figure = near_duplicates_figure(images, images, np.array([0.99, 0.98, 0.97]), count=3, total=50, threshold=0.95)
    titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
    assert titles == ["0.990", "0.980", "0.970"]
    assert "3 of 50 test images" in figure._suptitle.get_text()
    empty = near_duplicates_figure(images[:0], images[:0], np.zeros(0), count=0, total=50, threshold=0.95)
    assert "0 of 50" in empty._suptitle.get_text()
