"""The retrieval suite: mAP@5 for 10k queries against a 50k gallery (random unit vectors with 10-class
structure) at 128 and 2048 dimensions, computed three ways.

- the project: :func:`lib.retrieval.index.knn` + :func:`lib.retrieval.metrics.map_at_k`;
- a bare faiss flat search plus a one-line numpy mAP (goal: the project within 1.2x of it);
- the per-query scikit-learn ``NearestNeighbors`` loop of reference CIFAR projects (goal: the project
  >= 100x faster at 2048-d). The loop is timed on a subset of the queries and extrapolated linearly
  to all of them; the output says so.

Run alone: ``python -c "from benchmarks.retrieval import measure; print(measure())"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import (
    BenchmarkConfig,
    _median,
    blas_kernels,
    class_structured_unit_vectors,
    interleave,
)
from lib.retrieval.index import knn
from lib.retrieval.metrics import map_at_k


def project_map_at_5(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                     gallery_labels: np.ndarray) -> float:
    """The project's path: exact faiss search through :func:`lib.retrieval.index.knn`, then :func:`map_at_k`."""
    _, indices = knn(queries, gallery, 5, use_gpu=False)
    return map_at_k(gallery_labels[indices], query_labels, 5)


def bare_faiss_map_at_5(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                        gallery_labels: np.ndarray) -> float:
    """The floor: a bare ``IndexFlatIP`` search and the shortest numpy mAP@5 over its result."""
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    _, indices = index.search(queries, 5)
    relevant = gallery_labels[indices] == query_labels[:, None]
    return float((np.cumsum(relevant, axis=1) / np.arange(1, 6) * relevant).sum(axis=1).mean() / 5)


def sklearn_loop_map_at_5(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                          gallery_labels: np.ndarray) -> float:
    """The reference-project way: ``NearestNeighbors`` fitted on the gallery, one ``kneighbors`` call
    and one Python-level AP per query."""
    from sklearn.neighbors import NearestNeighbors

    model = NearestNeighbors(n_neighbors=5).fit(gallery)
    scores = []
    for query, label in zip(queries, query_labels, strict=True):
        _, neighbours = model.kneighbors(query[None, :])
        hits, total = 0, 0.0
        for rank, row in enumerate(neighbours[0], start=1):
            if gallery_labels[row] == label:
                hits += 1
                total += hits / rank
        scores.append(total / 5)
    return float(np.mean(scores))


def measure(rounds: int = 3, n_queries: int = 10_000, n_gallery: int = 50_000,
            dims: tuple[int, ...] = (128, 2048), sklearn_queries: int = 200) -> dict:
    """mAP@5 of ``n_queries`` against ``n_gallery`` at each of ``dims``: project vs bare faiss vs sklearn loop.

    Per dimension: median wall and CPU seconds over ``rounds`` interleaved rounds, the ratios
    project / bare faiss (goal <= 1.2) and sklearn loop / project (goal >= 100 at 2048-d), and the
    mAP@5 each side computed (they must agree). The sklearn loop runs on the first ``sklearn_queries``
    queries each round; its time is scaled by ``n_queries / sklearn_queries``.
    """
    results: dict = {"n_queries": n_queries, "n_gallery": n_gallery, "rounds": rounds, "blas": blas_kernels(),
                     "sklearn_note": f"sklearn loop timed on {sklearn_queries} queries per round, "
                                     f"extrapolated linearly x{n_queries / sklearn_queries:g} to {n_queries}"}
    for dim in dims:
        results[f"dim_{dim}"] = _retrieval_at(dim, rounds, n_queries, n_gallery, sklearn_queries)
    return results


def _retrieval_at(dim: int, rounds: int, n_queries: int, n_gallery: int, sklearn_queries: int) -> dict:
    gallery, gallery_labels, centres = class_structured_unit_vectors(n_gallery, dim, seed=1)
    queries, query_labels, _ = class_structured_unit_vectors(n_queries, dim, seed=2, centres=centres)
    subset = slice(0, sklearn_queries)
    sides: dict[str, Callable[[], object]] = {
        "project": lambda: project_map_at_5(queries, query_labels, gallery, gallery_labels),
        "bare_faiss": lambda: bare_faiss_map_at_5(queries, query_labels, gallery, gallery_labels),
        "sklearn_loop_subset": lambda: sklearn_loop_map_at_5(queries[subset], query_labels[subset],
                                                             gallery, gallery_labels),
    }
    measured = interleave(sides, rounds)
    wall, cpu = measured.wall, measured.cpu
    scale = n_queries / sklearn_queries
    project_subset = project_map_at_5(queries[subset], query_labels[subset], gallery, gallery_labels)
    row = {
        "project_s": _median(wall["project"]), "project_cpu_s": _median(cpu["project"]),
        "bare_faiss_s": _median(wall["bare_faiss"]), "bare_faiss_cpu_s": _median(cpu["bare_faiss"]),
        "sklearn_loop_s_extrapolated": _median([s * scale for s in wall["sklearn_loop_subset"]]),
        "sklearn_loop_cpu_s_extrapolated": _median([s * scale for s in cpu["sklearn_loop_subset"]]),
        "map@5_project": round(float(measured.last("project")), 5),
        "map@5_bare_faiss": round(float(measured.last("bare_faiss")), 5),
        "map@5_sklearn_subset": round(float(measured.last("sklearn_loop_subset")), 5),
        "map@5_project_same_subset": round(project_subset, 5),
    }
    row["ratio_project_over_bare_faiss"] = _ratio(row["project_s"], row["bare_faiss_s"], 3)
    row["ratio_project_over_bare_faiss_cpu"] = _ratio(row["project_cpu_s"], row["bare_faiss_cpu_s"], 3)
    row["ratio_sklearn_loop_over_project"] = _ratio(row["sklearn_loop_s_extrapolated"], row["project_s"], 1)
    return row


def _ratio(numerator: float, denominator: float, digits: int) -> float | None:
    """``numerator / denominator`` rounded; None when the denominator was too short to measure (a tiny run's CPU
    time can read 0)."""
    return round(numerator / denominator, digits) if denominator > 0 else None


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    return measure(rounds=min(cfg.rounds, 3))  # the scikit-learn loop side takes minutes per round


def summary(r: dict) -> str:
    return "; ".join(f"{dim[4:]}-d project/bare faiss {row['ratio_project_over_bare_faiss']}x, sklearn loop/project "
                     f"{row['ratio_sklearn_loop_over_project']}x" for dim, row in r.items() if dim.startswith("dim_"))
