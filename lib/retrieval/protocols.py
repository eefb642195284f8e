"""Evaluation protocols L and G, and the linear probe, on top of :mod:`lib.retrieval.index` and
:mod:`lib.retrieval.metrics`.

Protocol L: test queries against the test split itself, each query's own row excluded.
Protocol G: test queries against the train split. :func:`evaluate_protocols` runs both and returns
every number; :func:`linear_probe` is the logistic-regression accuracy on embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lib.devices import UseGpu
from lib.errors import UserError
from lib.retrieval.index import build_index, l2_normalize, search
from lib.retrieval.metrics import (
    average_precision_at_k,
    average_precision_at_r,
    knn_predict,
    mean_over_defined,
    precision_at_k_per_query,
    recall_at_k_per_query,
    relevant_counts,
)

# Neighbour lists are produced in query chunks of at most this many (query, neighbour) entries:
# ~50 MB of similarities, indices and per-entry temporaries, whatever the gallery size or R.
CHUNK_ENTRIES = 2_000_000


def _query_chunks(n_queries: int, k: int) -> Iterator[slice]:
    step = max(1, CHUNK_ENTRIES // max(k, 1))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


def evaluate_protocol(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                      gallery_labels: np.ndarray, leave_one_out: bool, ks: Sequence[int] = (1, 5),
                      knn_k: int = 5, use_gpu: UseGpu | bool = "auto") -> dict[str, float]:
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
        for k in ks:
            keep(f"p@{k}", precision_at_k_per_query(labels, own, k))
            if k > 1:
                keep(f"map@{k}", average_precision_at_k(labels, own, k))
                keep(f"recall@{k}", recall_at_k_per_query(labels, own, k))
        keep("map@r", average_precision_at_r(labels, own, counts[rows]))
        keep("knn_acc", knn_predict(labels, knn_k) == own)

    results = {}
    for name, chunks in per_query.items():
        values = np.concatenate(chunks)
        results[name] = mean_over_defined(values) if name == "map@r" else float(values.mean())
    return results


def evaluate_protocols(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray,
                       test_labels: np.ndarray, ks: Sequence[int] = (1, 5), knn_k: int = 5,
                       use_gpu: UseGpu | bool = "auto") -> dict[str, dict[str, float]]:
    """Protocols L and G (see the module docstring) for one model's embeddings.

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
