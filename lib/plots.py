"""Figures for the training and evaluation reports: they take arrays and return a matplotlib ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly, never through ``pyplot``: no global
figure registry to leak memory in a long job, no GUI backend, nothing to ``show``. PNG output goes
through the Agg renderer; :func:`save_figure` writes it atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from lib.io import atomic_open

CORRECT_COLOUR = (0.13, 0.63, 0.25)  # green frame: neighbour of the query's class
WRONG_COLOUR = (0.85, 0.10, 0.10)  # red frame: neighbour of another class
QUERY_COLOUR = (0.20, 0.20, 0.20)


def category_colours(n: int) -> ListedColormap:
    """``n`` distinguishable colours: tab10 up to 10 categories, tab20 up to 20, then evenly spaced turbo."""
    from matplotlib import colormaps

    if n <= 10:
        return ListedColormap(colormaps["tab10"].colors[:max(n, 1)])
    if n <= 20:
        return ListedColormap(colormaps["tab20"].colors[:n])
    return ListedColormap(colormaps["turbo"](np.linspace(0.0, 1.0, n)))


def _scatter_panel(axes, points: np.ndarray, groups: np.ndarray, names: Sequence[str] | None, title: str) -> None:
    """Draw (N, 2) ``points`` coloured by the integer-coded ``groups`` (N,), with a legend of ``names``."""
    values, codes = np.unique(groups, return_inverse=True)
    colours = category_colours(len(values))
    # small, slightly transparent markers: 10k points overlap, and density is part of the picture
    axes.scatter(points[:, 0], points[:, 1], c=codes, cmap=colours, vmin=-0.5, vmax=len(values) - 0.5,
                 s=3, alpha=0.7, linewidths=0, rasterized=True)
    handles = [axes.scatter([], [], color=colours(i), s=20) for i in range(len(values))]
    labels = [str(names[v]) if names is not None and 0 <= int(v) < len(names) else str(v) for v in values]
    axes.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
                markerscale=1.0)
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])


def _check_points(points: np.ndarray, *groups: np.ndarray) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected 2-D points of shape (N, 2), got {points.shape}")
    for group in groups:
        if np.shape(group) != (len(points),):
            raise ValueError(f"expected one label per point, got {np.shape(group)} for {len(points)} points")
    return points


def tsne_figure(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
                title: str = "t-SNE of test embeddings, coloured by true class") -> Figure:
    """``tsne.png``: the (N, 2) t-SNE map coloured by the true labels (N,); ``class_names[label]`` in the legend."""
    points = _check_points(points, labels)
    figure = Figure(figsize=(8, 6.5), layout="constrained")
    _scatter_panel(figure.add_subplot(), points, np.asarray(labels), class_names, title)
    return figure


def clusters_figure(points: np.ndarray, labels: np.ndarray, clusters: np.ndarray,
                    class_names: Sequence[str] | None = None, scores: dict[str, float] | None = None) -> Figure:
    """``clusters.png``: the same (N, 2) map twice, by true class (N,) and by K-Means cluster (N,).

    ``scores`` (e.g. ``{"nmi": .., "ari": .., "purity": ..}``) are printed in the figure title.
    """
    points = _check_points(points, labels, clusters)
    figure = Figure(figsize=(15, 6.5), layout="constrained")
    by_class, by_cluster = figure.subplots(1, 2)
    _scatter_panel(by_class, points, np.asarray(labels), class_names, "true class")
    cluster_ids = np.asarray(clusters)
    _scatter_panel(by_cluster, points, cluster_ids, [f"cluster {c}" for c in range(int(cluster_ids.max()) + 1)],
                   "K-Means cluster")
    if scores:
        figure.suptitle("  ".join(f"{name.upper()} {value:.3f}" for name, value in scores.items()))
    return figure


def _framed(image: np.ndarray, colour: tuple[float, float, float] | None, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H + 2w, W + 2w, 3) uint8 with a solid frame (white when ``colour`` is None)."""
    fill = np.array([255, 255, 255] if colour is None else [round(255 * c) for c in colour], dtype=np.uint8)
    height, width_px = image.shape[:2]
    out = np.empty((height + 2 * width, width_px + 2 * width, 3), dtype=np.uint8)
    out[:] = fill
    out[width:width + height, width:width + width_px] = image
    return out


def retrieval_grid_figure(query_images: np.ndarray, query_labels: np.ndarray, gallery_images: np.ndarray,
                          gallery_labels: np.ndarray, neighbour_indices: np.ndarray,
                          class_names: Sequence[str] | None = None,
                          similarities: np.ndarray | None = None) -> Figure:
    """``retrieval_grid.png``: one row per query, the query image then its k nearest gallery images.

    ``query_images`` (Q, H, W, 3) uint8, ``query_labels`` (Q,); ``gallery_images`` (N, H, W, 3) uint8,
    ``gallery_labels`` (N,); ``neighbour_indices`` (Q, k) gallery rows, nearest first (the query itself
    already excluded); ``similarities`` (Q, k), optional, printed under each neighbour. Each neighbour
    gets a green frame when its label is the query's and a red one otherwise.
    """
    query_images, gallery_images = np.asarray(query_images), np.asarray(gallery_images)
    neighbour_indices = np.asarray(neighbour_indices)
    for name, images in (("query_images", query_images), ("gallery_images", gallery_images)):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{name} must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    n_queries, k = neighbour_indices.shape
    if len(query_images) != n_queries:
        raise ValueError(f"{len(query_images)} query images but {n_queries} rows of neighbours")

    def name_of(label: int) -> str:
        return str(class_names[label]) if class_names is not None else str(label)

    # frames scale with the image so a 32-px CIFAR image and a 224-px photo look alike
    frame = max(1, query_images.shape[1] // 12)
    figure = Figure(figsize=(1.3 * (k + 1), 1.45 * n_queries), layout="constrained")
    grid = figure.subplots(n_queries, k + 1, squeeze=False)
    for q in range(n_queries):
        query_label = int(query_labels[q])
        cell = grid[q, 0]
        cell.imshow(_framed(query_images[q], QUERY_COLOUR, frame), interpolation="nearest")
        cell.set_title(f"query: {name_of(query_label)}", fontsize=7, fontweight="bold")
        for i in range(k):
            row = int(neighbour_indices[q, i])
            label = int(gallery_labels[row])
            colour = CORRECT_COLOUR if label == query_label else WRONG_COLOUR
            cell = grid[q, i + 1]
            cell.imshow(_framed(gallery_images[row], colour, frame), interpolation="nearest")
            caption = name_of(label) if similarities is None else f"{name_of(label)} {similarities[q, i]:.2f}"
            cell.set_title(caption, fontsize=7, color=colour)
    for cell in grid.flat:
        cell.set_axis_off()
    return figure


def near_duplicates_figure(test_images: np.ndarray, train_images: np.ndarray, similarities: np.ndarray,
                           count: int, total: int, threshold: float, columns: int = 6) -> Figure:
    """Pairs of (N, H, W, 3) uint8 ``test_images`` and their nearest ``train_images``, each pair titled with its
    similarity: the closest pairs of the near-duplicate check (``count`` of ``total`` test images at ``threshold``)."""
    pairs = len(test_images)
    rows = max(1, -(-pairs // columns))
    figure = Figure(figsize=(columns * 2.0, rows * 1.25 + 0.5))
    figure.suptitle(f"{count} of {total} test images have a train image at similarity >= {threshold}"
                    + (f"; the {pairs} closest (test | train)" if pairs else ""), fontsize=9)
    for i in range(rows * columns):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.set_axis_off()
        if i < pairs:
            gap = np.full((test_images.shape[1], 2, 3), 255, np.uint8)
            axes.imshow(np.concatenate([test_images[i], gap, train_images[i]], axis=1))
            axes.set_title(f"{similarities[i]:.3f}", fontsize=7)
    return figure


def loss_curve_figure(history: list[dict[str, Any]], title: str = "") -> Figure:
    """``loss_curve.png`` from per-epoch rows: losses (train from epoch 1, val from epoch 0) and val mAP@5 / P@5.

    Epoch 0 is the untrained network, so the right panel shows what training bought.
    """
    figure = Figure(figsize=(10, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    trained = [row for row in history if row.get("train_loss") is not None]
    left.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], "o-", label="train loss")
    left.plot([r["epoch"] for r in history], [r["val_loss"] for r in history], "s--", label="val loss")
    left.set_xlabel("epoch")
    left.set_ylabel("triplet loss")
    for key, style in (("val_map@5", "o-"), ("val_p@5", "s--")):
        right.plot([r["epoch"] for r in history], [r[key] for r in history], style, label=key)
    right.set_xlabel("epoch (0 = untrained)")
    right.set_ylabel("validation retrieval")
    for axes in (left, right):
        axes.legend()
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render ``figure`` as PNG (Agg) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return path
