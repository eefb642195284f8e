"""The t-SNE suite: :func:`lib.clustering.tsne_2d` against scikit-learn's ``TSNE`` (defaults, seeded) on the
same 10k x 128 data (random unit vectors with 10-class structure), with quality figures for both maps.

Run alone: ``python -c "from benchmarks.tsne import measure; print(measure())"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import BenchmarkConfig, _median, class_structured_unit_vectors, interleave
from lib.retrieval.index import knn
from lib.retrieval.metrics import knn_accuracy


def neighbour_preservation(high: np.ndarray, low: np.ndarray, k: int = 10) -> float:
    """Mean share of each point's k nearest neighbours in ``high`` (N, D) kept among its k nearest in ``low`` (N, 2)."""
    import faiss

    def neighbours(points: np.ndarray) -> np.ndarray:
        points = np.ascontiguousarray(points, dtype=np.float32)
        index = faiss.IndexFlatL2(points.shape[1])
        index.add(points)
        _, rows = index.search(points, k + 1)
        return rows[:, 1:]  # column 0 is the point itself (no duplicates in this data)

    high_rows, low_rows = neighbours(high), neighbours(low)
    shared = (high_rows[:, :, None] == low_rows[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / k)


def map_quality(high: np.ndarray, low: np.ndarray, labels: np.ndarray, subsample: int = 2000, seed: int = 0) -> dict:
    """Quality of a 2-D map ``low`` (N, 2) of ``high`` (N, D) with class ``labels`` (N,).

    ``knn_preservation@10`` (all points), ``trustworthiness@10`` (scikit-learn, on a seeded subsample,
    being quadratic), ``class_knn_acc_2d`` (leave-one-out 5-NN class accuracy in the map).
    """
    import faiss
    from sklearn.manifold import trustworthiness

    rows = np.random.default_rng(seed).choice(len(high), min(subsample, len(high)), replace=False)
    low32 = np.ascontiguousarray(low, dtype=np.float32)
    index = faiss.IndexFlatL2(2)
    index.add(low32)
    _, nearest = index.search(low32, 6)
    return {"knn_preservation@10": round(neighbour_preservation(high, low), 4),
            "trustworthiness@10": round(float(trustworthiness(high[rows], low[rows], n_neighbors=10)), 4),
            "class_knn_acc_2d": round(knn_accuracy(labels[nearest[:, 1:]], labels, 5), 4)}


def measure(rounds: int = 1, n: int = 10_000, dim: int = 128, spread: float | None = None) -> dict:
    """``lib.clustering.tsne_2d`` vs scikit-learn's ``TSNE`` (defaults, ``random_state=0``) on the same data.

    Interleaved ``rounds``; median wall and CPU seconds, the speed ratio, and :func:`map_quality`
    of each side's last map (plus the high-dimensional 5-NN class accuracy, the ceiling for the maps').
    """
    from sklearn.manifold import TSNE

    from lib.clustering import tsne_2d

    points, labels, _ = class_structured_unit_vectors(n, dim, seed=3, spread=spread)
    sides: dict[str, Callable[[], object]] = {
        "project": lambda: tsne_2d(points, seed=0),
        "sklearn": lambda: TSNE(n_components=2, random_state=0).fit_transform(points),
    }
    measured = interleave(sides, rounds, keep="last")
    _, high_neighbours = knn(points, points, 5, exclude_self=True, use_gpu=False)
    results: dict = {"n": n, "dim": dim, "rounds": rounds,
                     "class_knn_acc_high_dim": round(knn_accuracy(labels[high_neighbours], labels, 5), 4)}
    for name in sides:
        results[name] = {"wall_s": _median(measured.wall[name]), "cpu_s": _median(measured.cpu[name]),
                         **map_quality(points, np.asarray(measured.last(name)), labels)}
    results["speedup_wall"] = round(results["sklearn"]["wall_s"] / results["project"]["wall_s"], 2)
    results["speedup_cpu"] = round(results["sklearn"]["cpu_s"] / results["project"]["cpu_s"], 2)
    return results


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    return measure(rounds=1)  # scikit-learn's side alone takes about half a minute on 2 cores


def summary(r: dict) -> str:
    return (f"{r['n']} points, project {r['project']['wall_s']} s vs scikit-learn "
            f"{r['sklearn']['wall_s']} s -> {r['speedup_wall']}x")
