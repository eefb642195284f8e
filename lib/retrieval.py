"""Retrieval: exact nearest neighbours with faiss, and retrieval metrics over neighbour label tables.

Two layers (HOUSE_STYLE 9):

1. Search. :func:`knn` (or :func:`build_index` + :func:`search` for many query chunks against one
   gallery) wraps a faiss flat inner-product index, on the GPU when faiss has GPU support and a GPU
   is visible. Embeddings are float32 and L2-normalised (:func:`l2_normalize`), so the inner product
   is the cosine similarity and the search is exact.
2. Metrics. Pure numpy functions over a *neighbour label table*: ``neighbour_labels`` (Q, K), the
   labels of each query's K nearest gallery items, nearest first, the query itself already removed,
   and ``query_labels`` (Q,). Item i of query q is *relevant* when
   ``neighbour_labels[q, i] == query_labels[q]``. Every docstring pins its formula.

:func:`evaluate_protocols` runs both protocols of DESIGN "Metrics" and returns every number;
:func:`linear_probe` is the logistic-regression accuracy on embeddings.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from lib.errors import UserError


def _openblas_core_for_this_cpu() -> str | None:
    """The OpenBLAS kernel family this x86-64 Linux CPU can run ("SkylakeX", "Haswell"), else None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(flags):
        return "SkylakeX"
    if {"avx2", "fma"} <= set(flags):
        return "Haswell"
    return None


def _import_faiss() -> ModuleType:
    """Import faiss so that its bundled OpenBLAS uses this CPU's vector kernels.

    The faiss-cpu wheels bundle an OpenBLAS (0.3.15 in faiss-cpu 1.15) that does not recognise recent
    CPUs (Sapphire Rapids here) and falls back to its SSE3 "Prescott" kernels: measured here, a
    10k x 50k x 2048-d flat search took 7x longer than with the AVX-512 kernels. OpenBLAS reads
    ``OPENBLAS_CORETYPE`` once, when the library loads, so it is set only around this import and
    removed again (libraries loaded later detect their CPU as usual). A value the user set is kept.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    # faiss's loader logs every SIMD variant its wheel lacks; inside Ray workers those lines reach
    # the job's console on every start. Real import failures still raise.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    core = _openblas_core_for_this_cpu()
    if core is None or "OPENBLAS_CORETYPE" in os.environ:
        import faiss
        return faiss
    os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        os.environ.pop("OPENBLAS_CORETYPE", None)
    return faiss


faiss = _import_faiss()

UseGpu = bool | Literal["auto", "true", "false"]

# faiss's GPU k-selection handles at most this many neighbours per query; larger searches
# (MAP@R against a big gallery) run on the CPU index instead.
GPU_MAX_K = 2048
# Neighbour lists are produced in query chunks of at most this many (query, neighbour) entries:
# ~50 MB of similarities, indices and per-entry temporaries, whatever the gallery size or R.
CHUNK_ENTRIES = 2_000_000
PROTOCOLS = ("L", "G")


# --------------------------------------------------------------------------- search


def l2_normalize(embeddings: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """(N, D) -> (N, D) float32, C-contiguous, every row scaled to unit L2 norm.

    A zero row stays zero (``eps`` keeps the division finite) instead of becoming NaN.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"expected embeddings of shape (N, D), got {embeddings.shape}")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.ascontiguousarray(embeddings / np.maximum(norms, eps), dtype=np.float32)


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_use_gpu(use_gpu: UseGpu) -> bool:
    """``"auto"`` -> a GPU if :func:`gpu_available`; ``True``/``"true"`` insist on one, ``False``/``"false"`` never."""
    choice = str(use_gpu).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(f"use_gpu must be auto, true or false, got {use_gpu!r}")
    if choice == "false":
        return False
    if choice == "true" and not gpu_available():
        raise UserError("use_gpu=true but faiss has no GPU support or sees no GPU "
                        "(install faiss-gpu-cu12 on a CUDA machine, or use --use-gpu auto|false)")
    return gpu_available()


@dataclass
class GalleryIndex:
    """A faiss exact inner-product index over a gallery of ``size`` (N, D) float32 embeddings.

    ``resources`` keeps the GPU memory pool alive as long as the GPU index that uses it.
    """

    index: Any
    size: int
    dim: int
    on_gpu: bool
    resources: Any = None


def _as_search_array(embeddings: np.ndarray, name: str) -> np.ndarray:
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{name} must be a non-empty (N, D) array of embeddings, got shape {array.shape}")
    return array


def build_index(gallery: np.ndarray, use_gpu: UseGpu = "auto", max_k: int | None = None) -> GalleryIndex:
    """An exact ``IndexFlatIP`` over ``gallery`` (N, D), L2-normalised float32 expected.

    ``max_k`` is the largest k this index will be searched with; above :data:`GPU_MAX_K` the
    index stays on the CPU even when a GPU is available (faiss's GPU search cannot return more).
    """
    gallery = _as_search_array(gallery, "gallery")
    on_gpu = resolve_use_gpu(use_gpu) and (max_k is None or max_k <= GPU_MAX_K)
    index = faiss.IndexFlatIP(gallery.shape[1])
    resources = None
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(gallery)
    return GalleryIndex(index=index, size=gallery.shape[0], dim=gallery.shape[1], on_gpu=on_gpu,
                        resources=resources)


def drop_self_matches(similarities: np.ndarray, indices: np.ndarray,
                      self_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k+1) search results -> (Q, k) with each query's own gallery row ``self_rows`` (Q,) removed.

    The query's own row is removed wherever it ranks, not simply the first column: with duplicate
    images or tied similarities another item can come first. When the own row is not among the k+1
    (possible only with such ties), the last column is dropped so that every row keeps k neighbours.
    """
    is_self = indices == np.asarray(self_rows)[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # faiss returns each gallery row at most once per query, so exactly one entry per row is dropped
    keep = ~is_self
    k = indices.shape[1] - 1
    return similarities[keep].reshape(-1, k), indices[keep].reshape(-1, k)


def search(index: GalleryIndex, queries: np.ndarray, k: int,
           self_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar gallery items of each query, most similar first.

    ``queries`` (Q, D) float32. ``self_rows`` (Q,), when given, is each query's own row in the
    gallery (leave-one-out): k+1 are searched and that row is removed (:func:`drop_self_matches`).
    Returns ``similarities`` (Q, k) float32 and ``indices`` (Q, k) int64 gallery rows.
    """
    queries = _as_search_array(queries, "queries")
    if queries.shape[1] != index.dim:
        raise UserError(f"queries have {queries.shape[1]} dimensions but the gallery has {index.dim}")
    available = index.size - (1 if self_rows is not None else 0)
    if not 1 <= k <= available:
        raise UserError(f"cannot retrieve k={k} neighbours from a gallery of {index.size} items"
                        + (" (the query itself excluded)" if self_rows is not None else ""))
    extra = 1 if self_rows is not None else 0
    if index.on_gpu and k + extra > GPU_MAX_K:
        raise ValueError(f"k={k + extra} exceeds the GPU limit {GPU_MAX_K}; build the index with max_k")
    similarities, indices = index.index.search(queries, k + extra)
    if self_rows is not None:
        similarities, indices = drop_self_matches(similarities, indices, self_rows)
    return similarities, indices.astype(np.int64, copy=False)


def knn(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False,
        use_gpu: UseGpu = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by inner product (cosine on L2-normalised inputs).

    ``queries`` (Q, D) and ``gallery`` (N, D), float32, L2-normalised (see :func:`l2_normalize`).
    ``exclude_self=True`` is protocol L: the queries *are* the gallery (Q == N, row i is query i),
    and each query's own row is removed from its list (:func:`drop_self_matches`).
    Returns ``similarities`` (Q, k) float32, descending, and ``indices`` (Q, k) int64 gallery rows.
    """
    queries = _as_search_array(queries, "queries")
    gallery = _as_search_array(gallery, "gallery")
    self_rows = None
    if exclude_self:
        if queries.shape != gallery.shape:
            raise ValueError("exclude_self=True needs the queries to be the gallery (same shape)")
        self_rows = np.arange(len(queries))
    index = build_index(gallery, use_gpu, max_k=k + exclude_self)
    return search(index, queries, k, self_rows)


# --------------------------------------------------------------------------- metrics


def _relevance(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """(Q, K) labels and (Q,) labels -> (Q, k) bool, True where the neighbour shares the query's label."""
    neighbour_labels = np.asarray(neighbour_labels)
    query_labels = np.asarray(query_labels)
    if neighbour_labels.ndim != 2 or query_labels.shape != (neighbour_labels.shape[0],):
        raise ValueError(f"expected neighbour labels (Q, K) and query labels (Q,), got "
                         f"{neighbour_labels.shape} and {query_labels.shape}")
    k = neighbour_labels.shape[1] if k is None else k
    if not 1 <= k <= neighbour_labels.shape[1]:
        raise ValueError(f"k={k} needs at least k neighbours per query, the table has {neighbour_labels.shape[1]}")
    return neighbour_labels[:, :k] == query_labels[:, None]


def precision_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """P@k, mean over queries.

    P@k(q) = (1/k) * #{i <= k : rel_q(i)}, the share of the k nearest neighbours that share the
    query's label. The denominator is always k; the query itself is not in the table.
    """
    return float(_relevance(neighbour_labels, query_labels, k).mean(axis=1).mean())


def average_precision_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """AP@k per query, (Q,) float64.

    AP@k(q) = (1/k) * sum_{i<=k} P@i(q) * rel_q(i), where P@i(q) = (1/i) * #{j <= i : rel_q(j)}.
    The denominator is k, not the number of relevant items retrieved (DESIGN "Metrics": valid
    because every class has at least k relevant items), so a query whose k neighbours are all
    relevant scores 1 and one with no relevant neighbour scores 0.
    """
    relevant = _relevance(neighbour_labels, query_labels, k).astype(np.float64)
    ranks = np.arange(1, k + 1)
    precision_at_each_rank = np.cumsum(relevant, axis=1) / ranks
    return (precision_at_each_rank * relevant).sum(axis=1) / k


def map_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """mAP@k: the mean over queries of :func:`average_precision_at_k` (same denominator k)."""
    return float(average_precision_at_k(neighbour_labels, query_labels, k).mean())


def average_precision_at_r(neighbour_labels: np.ndarray, query_labels: np.ndarray,
                           relevant_counts: np.ndarray) -> np.ndarray:
    """AP@R per query, (Q,) float64 (Musgrave et al., "A Metric Learning Reality Check").

    AP@R(q) = (1/R_q) * sum_{i<=R_q} P@i(q) * rel_q(i), with R_q = ``relevant_counts[q]`` the number
    of gallery items sharing the query's label (the query itself excluded in protocol L). The table
    needs at least max(R_q) columns. Queries with R_q = 0 have nothing to retrieve: NaN.
    """
    relevant_counts = np.asarray(relevant_counts, dtype=np.int64)
    r_max = int(relevant_counts.max(initial=0))
    relevant = _relevance(neighbour_labels, query_labels, max(r_max, 1)).astype(np.float64)
    ranks = np.arange(1, relevant.shape[1] + 1)
    within_r = ranks[None, :] <= relevant_counts[:, None]
    precision_at_each_rank = np.cumsum(relevant, axis=1) / ranks
    total = (precision_at_each_rank * relevant * within_r).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(relevant_counts > 0, total / relevant_counts, np.nan)


def map_at_r(neighbour_labels: np.ndarray, query_labels: np.ndarray, relevant_counts: np.ndarray) -> float:
    """MAP@R: mean of :func:`average_precision_at_r` over the queries with R_q > 0.

    ``neighbour_labels`` (Q, K) with K >= max(R_q); ``relevant_counts`` (Q,) from :func:`relevant_counts`.
    Raises :class:`UserError` when no query has a relevant gallery item (the splits share no class).
    """
    per_query = average_precision_at_r(neighbour_labels, query_labels, relevant_counts)
    return _mean_over_defined(per_query)


def _mean_over_defined(per_query: np.ndarray) -> float:
    defined = per_query[~np.isnan(per_query)]
    if defined.size == 0:
        raise UserError("MAP@R is undefined: no query has an item of its class in the gallery")
    return float(defined.mean())


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """R per query, (Q,) int64: gallery items with the query's label, minus the query itself if ``exclude_self``."""
    classes, gallery_counts = np.unique(np.asarray(gallery_labels), return_counts=True)
    query_labels = np.asarray(query_labels)
    position = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    counts = np.where(classes[position] == query_labels, gallery_counts[position], 0)
    return (counts - int(exclude_self)).astype(np.int64)


def recall_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Recall@k: the share of queries with at least one relevant item among their k nearest neighbours."""
    return float(_relevance(neighbour_labels, query_labels, k).any(axis=1).mean())


def knn_predict(neighbour_labels: np.ndarray, k: int = 5) -> np.ndarray:
    """(Q, K) neighbour labels -> (Q,) the majority label among the first k.

    Ties are broken by rank: among the labels with the most votes, the one whose nearest occurrence
    ranks first wins (so with k=5 and votes 2-2-1, the tied label seen first in the list). This is
    deterministic and needs no similarity values.
    """
    neighbour_labels = np.asarray(neighbour_labels)
    if neighbour_labels.ndim != 2 or not 1 <= k <= neighbour_labels.shape[1]:
        raise ValueError(f"k={k} needs a (Q, K >= k) label table, got {neighbour_labels.shape}")
    top = neighbour_labels[:, :k]
    # votes[q, i]: how many of the first k neighbours share neighbour i's label
    votes = (top[:, :, None] == top[:, None, :]).sum(axis=2)
    # argmax returns the first (nearest) position holding the highest vote count
    winner = np.argmax(votes == votes.max(axis=1, keepdims=True), axis=1)
    return top[np.arange(len(top)), winner]


def knn_accuracy(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int = 5) -> float:
    """kNN classification accuracy: share of queries whose :func:`knn_predict` label is their own."""
    query_labels = np.asarray(query_labels)
    return float((knn_predict(neighbour_labels, k) == query_labels).mean())


# --------------------------------------------------------------------------- protocols


def _query_chunks(n_queries: int, k: int) -> Iterator[slice]:
    step = max(1, CHUNK_ENTRIES // max(k, 1))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


def evaluate_protocol(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                      gallery_labels: np.ndarray, leave_one_out: bool, ks: Sequence[int] = (1, 5),
                      knn_k: int = 5, use_gpu: UseGpu = "auto") -> dict[str, float]:
    """Every retrieval metric of one protocol, from one exact search per query chunk.

    ``queries`` (Q, D) and ``gallery`` (N, D), L2-normalised float32; labels (Q,) and (N,).
    ``leave_one_out``: the queries are the gallery and each query's own row is excluded.

    MAP@R is exact, with no cap on R: each chunk of queries is searched for max(R) neighbours
    (R = the largest class in the gallery, e.g. 5,000 for CIFAR-10's train split), its per-query
    values are kept and its neighbour lists dropped, so memory stays near :data:`CHUNK_ENTRIES`
    entries whatever the gallery. For k = 1, AP@1 and recall@1 equal P@1, so only ``p@1`` is reported.
    Returns ``p@k`` for every k in ``ks``, ``map@k`` and ``recall@k`` for every k > 1, ``map@r``
    and ``knn_acc`` (majority of ``knn_k``, see :func:`knn_predict`).
    """
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(query_labels) != len(queries) or len(gallery_labels) != len(gallery):
        raise ValueError("every embedding needs exactly one label")
    counts = relevant_counts(query_labels, gallery_labels, exclude_self=leave_one_out)
    # one search serves every metric: R_max <= the gallery size, and a too-large k or knn_k is a UserError
    k_needed = max(max(ks), knn_k, int(counts.max(initial=0)))
    index = build_index(gallery, use_gpu, max_k=k_needed + int(leave_one_out))

    per_query: dict[str, list[np.ndarray]] = {}

    def keep(name: str, values: np.ndarray) -> None:
        per_query.setdefault(name, []).append(np.asarray(values, dtype=np.float64))

    for rows in _query_chunks(len(queries), k_needed):
        self_rows = np.arange(rows.start, rows.stop) if leave_one_out else None
        _, indices = search(index, queries[rows], k_needed, self_rows)
        labels, own = gallery_labels[indices], query_labels[rows]
        relevant = labels == own[:, None]
        for k in ks:
            keep(f"p@{k}", relevant[:, :k].mean(axis=1))
            if k > 1:
                keep(f"map@{k}", average_precision_at_k(labels, own, k))
                keep(f"recall@{k}", relevant[:, :k].any(axis=1))
        keep("map@r", average_precision_at_r(labels, own, counts[rows]))
        keep("knn_acc", knn_predict(labels, knn_k) == own)

    results = {}
    for name, chunks in per_query.items():
        values = np.concatenate(chunks)
        results[name] = _mean_over_defined(values) if name == "map@r" else float(values.mean())
    return results


def evaluate_protocols(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray,
                       test_labels: np.ndarray, ks: Sequence[int] = (1, 5), knn_k: int = 5,
                       use_gpu: UseGpu = "auto") -> dict[str, dict[str, float]]:
    """Protocols L and G of DESIGN "Metrics" for one model's embeddings.

    ``train_emb`` (N, D), ``test_emb`` (Q, D) (normalised here; any scale is fine), labels (N,), (Q,).
    ``"L"``: test queries against the test split itself, each query's own row excluded.
    ``"G"``: test queries against the train split. With the default ``ks`` each holds exactly
    ``p@1``, ``p@5``, ``map@5``, ``recall@5``, ``map@r`` and ``knn_acc`` (see :func:`evaluate_protocol`);
    ``G``'s ``knn_acc`` is the usual kNN classifier (test classified by train neighbours).
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    train, test = l2_normalize(train_emb), l2_normalize(test_emb)
    if train.shape[1] != test.shape[1]:
        raise UserError(f"train embeddings have {train.shape[1]} dimensions, test embeddings {test.shape[1]}")
    return {
        "L": evaluate_protocol(test, test_labels, test, test_labels, leave_one_out=True, ks=ks,
                               knn_k=knn_k, use_gpu=use_gpu),
        "G": evaluate_protocol(test, test_labels, train, train_labels, leave_one_out=False, ks=ks,
                               knn_k=knn_k, use_gpu=use_gpu),
    }


def linear_probe(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray,
                 test_labels: np.ndarray, max_iter: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Linear-probe accuracy: (train accuracy, test accuracy) of a logistic regression on embeddings.

    ``train_emb`` (N, D), ``test_emb`` (Q, D), normalised here; labels (N,), (Q,). The model is
    fitted on the train split only; ``test_labels`` are used for nothing but the test accuracy.
    """
    from sklearn.linear_model import LogisticRegression

    train, test = l2_normalize(train_emb), l2_normalize(test_emb)
    train_labels = np.asarray(train_labels)
    if len(np.unique(train_labels)) < 2:
        raise UserError("the linear probe needs at least two classes in the train split")
    model = LogisticRegression(max_iter=max_iter, random_state=seed)
    model.fit(train, train_labels)
    return float(model.score(train, train_labels)), float(model.score(test, np.asarray(test_labels)))
