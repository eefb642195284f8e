"""Saved gallery indexes for ``jobs.search`` and ``jobs.serve``: exact, IVF-Flat or HNSW, with their recall.

The metrics never use these (their definitions need exact search: :mod:`lib.retrieval.index`); a big gallery's
one-query search does. Every kind is a faiss inner-product index over L2-normalised float32 vectors, so a
similarity means the same (cosine) whichever kind answers:

- ``exact``: ``IndexFlatIP``, every gallery row compared with the query;
- ``ivf``: ``IndexIVFFlat``, the gallery split into ``nlist`` k-means cells; a query compares its vector with the
  rows of its ``nprobe`` nearest cells only (rows kept uncompressed, so a found neighbour's similarity is exact);
- ``hnsw``: ``IndexHNSWFlat``, a navigable small-world graph of ``M`` links per row, walked with a beam of
  ``efSearch`` candidates.

The search parameter (``nprobe``, ``efSearch``) is chosen by measurement: the smallest value on a ladder whose
recall@k on one set of held-out queries reaches the target, then recall@k is measured again on another set
(so the reported figure is not the one the choice was fitted to).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

IndexKind = Literal["exact", "ivf", "hnsw"]
IndexChoice = Literal["exact", "ivf", "hnsw", "auto"]
INDEX_KINDS: tuple[str, ...] = ("exact", "ivf", "hnsw")
# --index auto: exact search below this many gallery rows, AUTO_APPROXIMATE at and above. Measured with
# jobs.benchmark --suites scale on the 2-core development machine (docs/benchmarks.md): one exact query took a median
# 8.8 ms over 50k x 128-d rows, 17.6 ms over 100k and 155 ms over 1M (IVF at recall@5 0.97: 1.0, 1.5 and 34 ms).
# Below 100k rows exact search leaves the page's 50 ms budget room for the network, and its neighbours are those the
# metrics count; from there the exact search grows past it.
AUTO_EXACT_BELOW = 100_000
AUTO_APPROXIMATE: IndexKind = "ivf"
INDEX_HELP = (f"the index jobs.search and jobs.serve use: exact, ivf (IVF-Flat), hnsw, or auto (exact below "
              f"{AUTO_EXACT_BELOW:,} gallery rows, else {AUTO_APPROXIMATE}); the metrics always use exact search")
RECALL_K = 5
# an IVF cell needs about this many training points per centroid (faiss warns below 39)
IVF_TRAIN_POINTS_PER_LIST = 40
# k-means training sample per cell and iterations: cells need not be converged (nprobe is tuned to the cells there
# are), and training on every row of a 1M gallery with faiss's 25 iterations took longer than adding them
IVF_TRAIN_SAMPLE_PER_LIST = 64
IVF_TRAIN_ITERATIONS = 10
HNSW_LINKS = 32  # M: links per row (faiss's upper layers get M, the bottom layer 2M)
HNSW_EF_CONSTRUCTION = 40  # faiss's default build beam; measured builds at 1M rows in docs/benchmarks.md
HNSW_EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
SEARCH_PARAMETER = {"ivf": "nprobe", "hnsw": "efSearch"}


def resolve_index_kind(choice: IndexChoice, rows: int) -> IndexKind:
    """``auto`` -> ``exact`` below :data:`AUTO_EXACT_BELOW` gallery rows, else :data:`AUTO_APPROXIMATE`."""
    if choice == "auto":
        return "exact" if rows < AUTO_EXACT_BELOW else AUTO_APPROXIMATE
    return choice


def ivf_lists(rows: int) -> int:
    """Cells of an IVF index over ``rows`` vectors: the power of two nearest 2 * sqrt(rows) (2,048 at 1M rows,
    4,096 at 5M), fewer where there are not :data:`IVF_TRAIN_POINTS_PER_LIST` rows per cell to train on."""
    wanted = 2 ** round(math.log2(max(2 * math.sqrt(rows), 1)))
    return max(1, min(wanted, rows // IVF_TRAIN_POINTS_PER_LIST))


def ivf_probe_ladder(nlist: int) -> list[int]:
    """The ``nprobe`` values tried: 1, 2, 3, 4, 6, 8, 12, ... (powers of two and their halfway points) up to
    ``nlist``, which probes every cell (exact search)."""
    ladder = sorted({value for i in range(int(math.log2(nlist)) + 1) for value in (2 ** i, 3 * 2 ** i // 2)
                     if value < nlist} | {nlist})
    return ladder


def build_index(vectors: np.ndarray, kind: IndexKind, seed: int = 0) -> Any:
    """A faiss inner-product index of ``kind`` over ``vectors`` (N, D), float32, L2-normalised.

    IVF trains its k-means (:data:`IVF_TRAIN_ITERATIONS` iterations) on a seeded sample of
    :data:`IVF_TRAIN_SAMPLE_PER_LIST` rows per cell (all rows when there are fewer). The search parameter is left at faiss's default: :func:`tune_search` sets it.
    """
    from lib.retrieval.index import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rows, dim = vectors.shape
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = ivf_lists(rows)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.niter = seed, IVF_TRAIN_ITERATIONS
        if nlist == 1:  # one cell holds every row: no k-means (faiss would warn of too few training points)
            index.quantizer.add(vectors.mean(axis=0, keepdims=True))
            index.is_trained = True
        else:
            sample = min(rows, nlist * IVF_TRAIN_SAMPLE_PER_LIST)
            train_rows = np.sort(np.random.default_rng(seed).choice(rows, sample, replace=False))
            index.train(vectors[train_rows])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        raise ValueError(f"unknown index kind {kind!r} (choose from {', '.join(INDEX_KINDS)})")
    # added in chunks so that faiss's per-call scratch memory (IVF's cell assignments) stays small
    for start in range(0, rows, 262_144):
        index.add(vectors[start:start + 262_144])
    return index


def index_parameters(index: Any, kind: IndexKind) -> dict[str, int]:
    """The build and search parameters of a built (and tuned) index, as ``index.json`` records them."""
    if kind == "ivf":
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}
    if kind == "hnsw":
        return {"M": HNSW_LINKS, "efConstruction": int(index.hnsw.efConstruction), "efSearch": int(index.hnsw.efSearch)}
    return {}


def set_search_parameter(index: Any, kind: IndexKind, value: int) -> None:
    """Set ``nprobe`` (ivf) or ``efSearch`` (hnsw); nothing for ``exact``."""
    if kind == "ivf":
        index.nprobe = int(value)
    elif kind == "hnsw":
        index.hnsw.efSearch = int(value)


def search_ladder(index: Any, kind: IndexKind) -> list[int]:
    """The search-parameter values :func:`tune_search` tries for this index, cheapest first."""
    if kind == "ivf":
        return ivf_probe_ladder(int(index.nlist))
    if kind == "hnsw":
        return list(HNSW_EF_LADDER)
    return []


def search_full(index: Any, kind: IndexKind, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (Q, k), rows (Q, k) int64) of ``index.search``, with every row filled.

    An IVF search returns -1 rows when its ``nprobe`` cells hold fewer than ``k`` vectors; those queries are searched
    again over every cell (exact for them), so a caller always gets ``k`` real gallery rows.
    """
    similarities, rows = index.search(queries, k)
    short = (rows < 0).any(axis=1)
    if kind == "ivf" and short.any():
        from lib.retrieval.index import faiss

        params = faiss.SearchParametersIVF(nprobe=int(index.nlist))
        similarities[short], rows[short] = index.search(queries[short], k, params=params)
    return similarities, rows.astype(np.int64, copy=False)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ exact_i| / k: ``found`` and ``exact`` are (Q, k) gallery rows of the
    approximate and the exact search. Ties at the k-th similarity can swap rows of equal similarity, which this
    counts as misses (it never overstates)."""
    if found.shape != exact.shape or found.ndim != 2:
        raise ValueError(f"expected two (Q, k) tables of the same shape, got {found.shape} and {exact.shape}")
    k = exact.shape[1]
    hits = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(found, exact, strict=True)]
    return float(np.mean(hits) / k)


def tune_search(index: Any, kind: IndexKind, queries: np.ndarray, exact_rows: np.ndarray, target: float,
                k: int = RECALL_K) -> tuple[int | None, list[dict[str, float]]]:
    """Set the smallest search-parameter value on :func:`search_ladder` whose recall@k on ``queries`` (Q, D)
    against ``exact_rows`` (Q, k) reaches ``target`` (the ladder's last value when none does).

    Returns (the value set, or None for ``exact``; every value tried with its recall, cheapest first).
    """
    tried: list[dict[str, float]] = []
    for value in search_ladder(index, kind):
        set_search_parameter(index, kind, value)
        recall = recall_at_k(search_full(index, kind, queries, k)[1], exact_rows)
        tried.append({SEARCH_PARAMETER[kind]: value, f"recall@{k}": round(recall, 4)})
        if recall >= target:
            return value, tried
    return (tried[-1][SEARCH_PARAMETER[kind]] if tried else None), tried


@dataclass
class BuiltIndex:
    """An index built and tuned by :func:`build_tuned_index`, with what ``index.json`` says of it."""

    index: Any
    kind: IndexKind
    parameters: dict[str, int]
    recall: float  # recall@RECALL_K on the report queries (1.0 for exact search, by definition)
    build_s: float  # build + tuning, wall seconds
    tried: list[dict[str, float]] = field(default_factory=list)


def build_tuned_index(vectors: np.ndarray, kind: IndexKind, tune_queries: np.ndarray, report_queries: np.ndarray,
                      target: float, seed: int = 0,
                      exact_neighbours: Callable[[np.ndarray], np.ndarray] | None = None) -> BuiltIndex:
    """Build ``kind`` over ``vectors`` (N, D), tune its search parameter to ``target`` recall@5 on
    ``tune_queries`` (Q1, D), and measure recall@5 on ``report_queries`` (Q2, D) against exact search.

    ``exact_neighbours(queries) -> (Q, 5) rows`` is the exact search (default: a CPU flat search of ``vectors``).
    """
    from lib.retrieval.index import knn

    k = min(RECALL_K, len(vectors))

    def exact(queries: np.ndarray) -> np.ndarray:
        if exact_neighbours is not None:
            return exact_neighbours(queries)[:, :k]
        return knn(queries, vectors, k, use_gpu=False)[1]

    started = time.perf_counter()
    index = build_index(vectors, kind, seed)
    if kind == "exact":
        return BuiltIndex(index, kind, {}, 1.0, time.perf_counter() - started)
    _, tried = tune_search(index, kind, tune_queries, exact(tune_queries), target, k)
    build_s = time.perf_counter() - started
    recall = recall_at_k(search_full(index, kind, report_queries, k)[1], exact(report_queries))
    return BuiltIndex(index, kind, index_parameters(index, kind), recall, build_s, tried)
