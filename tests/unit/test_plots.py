import os

import numpy as np
import pytest
from PIL import Image

from lib.plots import (
    WRONG_COLOUR,
    clusters_figure,
    loss_curve_figure,
    retrieval_grid_figure,
    save_figure,
    tsne_figure,
)

CLASS_NAMES = [f"class{i}" for i in range(10)]


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def distinct_colours(pixels):
    return len(np.unique(pixels.reshape(-1, 3), axis=0))


def has_colour(pixels, colour, tolerance=6):
    target = np.array([round(255 * c) for c in colour])
    return bool((np.abs(pixels.astype(int) - target).max(axis=2) <= tolerance).any())


@pytest.fixture
def points_and_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 60)
    points = rng.normal(size=(600, 2)) + np.stack([np.cos(labels), np.sin(labels)], axis=1) * 8
    return points, labels


def test_tsne_and_clusters_pngs_are_written_and_not_blank(tmp_path, points_and_labels):
    points, labels = points_and_labels
    clusters = (labels + 3) % 10
    tsne = save_figure(tsne_figure(points, labels, CLASS_NAMES), tmp_path / "tsne.png")
    both = save_figure(clusters_figure(points, labels, clusters, CLASS_NAMES,
                                       scores={"nmi": 0.5, "ari": 0.4, "purity": 0.6}), tmp_path / "clusters.png")
    assert sorted(os.listdir(tmp_path)) == ["clusters.png", "tsne.png"]  # no temporaries left behind
    for path in (tsne, both):
        pixels = read_png(path)
        assert path.stat().st_size > 20_000 and distinct_colours(pixels) > 50
    # the two-panel figure is about twice as wide as the single map
    assert read_png(both).shape[1] > 1.6 * read_png(tsne).shape[1]


def test_retrieval_grid_marks_wrong_neighbours_in_red(tmp_path):
    rng = np.random.default_rng(1)
    # grey images: the red of a frame cannot come from the pictures themselves
    gallery = np.repeat(rng.integers(0, 256, size=(20, 32, 32, 1), dtype=np.uint8), 3, axis=3)
    gallery_labels = np.arange(20) % 4
    queries, query_labels = gallery[:3], gallery_labels[:3]
    all_right = np.array([[4, 8, 12], [5, 9, 13], [6, 10, 14]])  # same class as each query (index mod 4)
    path = save_figure(retrieval_grid_figure(queries, query_labels, gallery, gallery_labels, all_right,
                                             class_names=["cat", "dog", "frog", "ship"],
                                             similarities=rng.random((3, 3))), tmp_path / "grid.png")
    pixels = read_png(path)
    assert path.stat().st_size > 20_000 and distinct_colours(pixels) > 200
    assert not has_colour(pixels, WRONG_COLOUR)

    one_wrong = all_right.copy()
    one_wrong[1, 2] = 15  # class 3 for a class-1 query
    pixels = read_png(save_figure(retrieval_grid_figure(queries, query_labels, gallery, gallery_labels, one_wrong),
                                  tmp_path / "grid_wrong.png"))
    assert has_colour(pixels, WRONG_COLOUR)


def test_bad_shapes_are_rejected(points_and_labels):
    points, labels = points_and_labels
    with pytest.raises(ValueError, match="one label per point"):
        tsne_figure(points, labels[:-1])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        retrieval_grid_figure(np.zeros((1, 8, 8, 3)), [0], np.zeros((2, 8, 8, 3), np.uint8), [0, 0], [[1]])


def test_loss_curve_draws_both_panels(tmp_path):
    history = [{"epoch": 0, "train_loss": None, "val_loss": 0.30, "val_map@5": 0.10, "val_p@5": 0.18}]
    history += [{"epoch": e, "train_loss": 0.3 - 0.05 * e, "val_loss": 0.29 - 0.04 * e,
                 "val_map@5": 0.1 + 0.03 * e, "val_p@5": 0.18 + 0.03 * e} for e in range(1, 4)]
    figure = loss_curve_figure(history, title="resnet50")
    left, right = figure.axes
    assert [len(line.get_xdata()) for line in left.get_lines()] == [3, 4]  # train from epoch 1, val from 0
    assert [line.get_label() for line in right.get_lines()] == ["val_map@5", "val_p@5"]
    pixels = read_png(save_figure(figure, tmp_path / "loss_curve.png"))
    assert pixels.shape[1] > 1000 and distinct_colours(pixels) > 20
