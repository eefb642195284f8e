"""Retrieval metrics: pure numpy functions over a neighbour label table (no search, no faiss).

A *neighbour label table* is ``neighbour_labels`` (Q, K), the labels of each query's K nearest
gallery items, nearest first, the query itself already removed, with ``query_labels`` (Q,).
Item i of query q is *relevant* when ``neighbour_labels[q, i] == query_labels[q]``. Every
docstring pins its formula.
"""

from __future__ import annotations

import numpy as np

from lib.errors import UserError


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


def precision_at_k_per_query(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """P@k per query, (Q,) float64.

    P@k(q) = (1/k) * #{i <= k : rel_q(i)}, the share of the k nearest neighbours that share the
    query's label. The denominator is always k; the query itself is not in the table.
    """
    return _relevance(neighbour_labels, query_labels, k).mean(axis=1)


def precision_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """P@k: the mean over queries of :func:`precision_at_k_per_query` (denominator k)."""
    return float(precision_at_k_per_query(neighbour_labels, query_labels, k).mean())


def average_precision_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """AP@k per query, (Q,) float64.

    AP@k(q) = (1/k) * sum_{i<=k} P@i(q) * rel_q(i), where P@i(q) = (1/i) * #{j <= i : rel_q(j)}.
    The denominator is k, not the number of relevant items retrieved (valid because every
    class has at least k relevant items), so a query whose k neighbours are all
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
    return mean_over_defined(per_query)


def mean_over_defined(per_query: np.ndarray) -> float:
    """The mean of per-query AP@R values (:func:`average_precision_at_r`) over the queries where it is defined
    (not NaN); a :class:`UserError` when none is."""
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


def recall_at_k_per_query(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """Recall@k per query, (Q,) float64: 1 when at least one of the k nearest neighbours is relevant, else 0."""
    return _relevance(neighbour_labels, query_labels, k).any(axis=1).astype(np.float64)


def recall_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Recall@k: the share of queries with at least one relevant item among their k nearest neighbours
    (the mean of :func:`recall_at_k_per_query`)."""
    return float(recall_at_k_per_query(neighbour_labels, query_labels, k).mean())


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
