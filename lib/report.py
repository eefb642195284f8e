"""The evaluation report: the ``metrics.json`` document, the ``results.md`` table and the CSV export.

Pure functions over numbers the evaluation computed (no Ray, no models), so the file layouts below are
pinned by unit tests (``tests/unit/test_report.py``):

``metrics.json``::

    {"models":   {NAME: {"L": {"map@5", "p@5", "p@1", "map@r", "recall@5", "knn_acc"},
                         "G": {... the same ...},
                         "train_acc", "test_acc",   # linear probe fitted on train
                         "knn_acc"}},               # protocol G: test classified by its 5 train neighbours
     "clusters": {NAME: {"nmi", "ari", "purity"}},  # K-Means on test embeddings, k = classes
     "config":   {...}}                             # the resolved evaluation config and its inputs

``NAME`` is a backbone, ``<backbone>-untrained`` or ``stacked``. The stacked model also carries
``stacking_classifier: {"train_acc", "test_acc"}``, the stacking ensemble of
:func:`lib.stacking.fit_stacking_classifier`.

``map.json`` (the page's embedding map, :func:`tsne_map_document`; one column per key, row i = point i)::

    {"model": NAME, "classes": [class name, ...], "clusters": K,
     "id": [test id, ...], "x": [...], "y": [...],   # the t-SNE coordinates of tsne.png
     "label": [class index, ...], "cluster": [K-Means cluster, ...]}
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lib.io import atomic_open

PROTOCOL_KEYS = ("map@5", "p@5", "p@1", "map@r")
MODEL_KEYS = ("train_acc", "test_acc", "knn_acc")
CLUSTER_KEYS = ("nmi", "ari", "purity")
STACKED = "stacked"
# What "best model" means for the t-SNE map, the retrieval grid and the saved index.
RANKING = ("G", "map@5")


def model_entry(protocols: Mapping[str, Mapping[str, float]], train_acc: float, test_acc: float,
                **extra: Any) -> dict[str, Any]:
    """One ``models.<name>`` entry from :func:`lib.retrieval.protocols.evaluate_protocols` and the probe.

    ``knn_acc`` is protocol G's: each test image classified by the majority of its 5 nearest train images.
    """
    for protocol in ("L", "G"):
        missing = [key for key in (*PROTOCOL_KEYS, "knn_acc") if key not in protocols.get(protocol, {})]
        if missing:
            raise ValueError(f"protocol {protocol} lacks {', '.join(missing)}")
    return {"L": {k: float(v) for k, v in protocols["L"].items()},
            "G": {k: float(v) for k, v in protocols["G"].items()},
            "train_acc": float(train_acc), "test_acc": float(test_acc),
            "knn_acc": float(protocols["G"]["knn_acc"]), **extra}


def metrics_document(models: Mapping[str, dict[str, Any]], clusters: Mapping[str, Mapping[str, float]],
                     config: Mapping[str, Any]) -> dict[str, Any]:
    """The whole ``metrics.json`` document; raises ``ValueError`` when a model or cluster key is missing."""
    if set(models) != set(clusters):
        raise ValueError(f"models {sorted(models)} and clusters {sorted(clusters)} differ")
    for name, entry in models.items():
        missing = [key for key in MODEL_KEYS if key not in entry]
        missing += [f"{p}.{key}" for p in ("L", "G") for key in PROTOCOL_KEYS if key not in entry.get(p, {})]
        missing += [f"clusters.{key}" for key in CLUSTER_KEYS if key not in clusters[name]]
        if missing:
            raise ValueError(f"model {name} lacks {', '.join(missing)}")
    return {"models": {name: dict(models[name]) for name in models},
            "clusters": {name: {key: float(clusters[name][key]) for key in CLUSTER_KEYS} for name in models},
            "config": dict(config)}


def best_model(models: Mapping[str, Mapping[str, Any]], candidates: Iterable[str] | None = None) -> str:
    """The model with the highest protocol-G mAP@5 (ties: protocol-L mAP@5, then the name) among ``candidates``."""
    names = list(models if candidates is None else candidates)
    if not names:
        raise ValueError("no model to choose from")
    protocol, key = RANKING
    return max(sorted(names), key=lambda n: (models[n][protocol][key], models[n]["L"][key]))


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def results_markdown(metrics: Mapping[str, Any], notes: Iterable[str] = ()) -> str:
    """``results.md``: one row per model, every column labelled with its protocol, then ``notes`` lines."""
    models, clusters, notes = metrics["models"], metrics["clusters"], list(notes)
    header = ("| model | train acc (probe) | test acc (probe) | kNN acc (G, k=5) | mAP@5 L | P@5 L | "
              "mAP@5 G | P@5 G | P@1 G | MAP@R G | NMI |")
    lines = ["# Evaluation results", "", header, "|" + "---|" * (header.count("|") - 1)]
    for name, entry in models.items():
        cells = [entry["train_acc"], entry["test_acc"], entry["knn_acc"], entry["L"]["map@5"], entry["L"]["p@5"],
                 entry["G"]["map@5"], entry["G"]["p@5"], entry["G"]["p@1"], entry["G"]["map@r"],
                 clusters[name]["nmi"]]
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    stacked = models.get(STACKED, {}).get("stacking_classifier")
    lines += ["", "Protocols: **L** = leave-one-out on the test split (queries = gallery = test, the query itself "
              "excluded); **G** = test queries against the train gallery. P@k = share of the k nearest "
              "neighbours with the query's class; mAP@5 = mean over queries of (1/5) sum P@i rel_i; MAP@R = "
              "mean average precision over the R = class-size nearest neighbours. Train/test acc = logistic-"
              "regression linear probe fitted on train embeddings. NMI = K-Means (k = classes) on test "
              "embeddings against the true classes."]
    if stacked:
        lines += ["", f"Stacking classifier (level 0: one logistic regression per backbone, level 1: a logistic "
                      f"regression on their out-of-fold probabilities): train acc {stacked['train_acc']:.3f}, "
                      f"test acc {stacked['test_acc']:.3f}. The `stacked` row is the stacked embedding "
                      f"(concatenation projected by a model fitted on train + val, never test)."]
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


def near_duplicates_note(metrics: Mapping[str, Any], leaked: int, test_rows: int, threshold: float) -> str:
    """The ``results.md`` line on test images with a near-duplicate in train, and protocol G without them."""
    key = "G_without_near_duplicates"
    line = (f"Near-duplicates: {leaked} of {test_rows} test images ({100 * leaked / max(1, test_rows):.2f} %) have a "
            f"train image at pixel-signature cosine similarity >= {threshold} (lib.duplicates; near_duplicates.parquet, "
            f"near_duplicates.png).")
    scored = {name: entry[key] for name, entry in metrics["models"].items() if key in entry}
    if scored:
        line += " Protocol G without them, mAP@5 (with them): " + ", ".join(
            f"{name} {values['map@5']:.3f} ({metrics['models'][name]['G']['map@5']:.3f})"
            for name, values in scored.items()) + "."
    return line


def seeded_subset(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of a seeded random subset of at most ``limit`` of ``n`` rows (all when ``limit`` <= 0)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def grid_query_rows(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` rows for a retrieval grid, taking the classes in turn so every class shows up early.

    Within each class the rows are a seeded shuffle; classes come in label order.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [list(rng.permutation(np.flatnonzero(labels == label))) for label in np.unique(labels)]
    rows: list[int] = []
    while len(rows) < min(count, len(labels)):
        for members in per_class:
            if members and len(rows) < count:
                rows.append(int(members.pop(0)))
    return np.asarray(rows, dtype=np.int64)


def tsne_map_document(model: str, classes: list[str], ids: np.ndarray, labels: np.ndarray, clusters: np.ndarray,
                      points: np.ndarray) -> dict[str, Any]:
    """``map.json``'s document: the (N, 2) t-SNE ``points`` of test ``ids`` (N,) with their class ``labels`` (N,)
    and K-Means ``clusters`` (N,); coordinates rounded to 3 decimals (a map spans tens of units)."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if points.shape != (n, 2) or any(np.shape(column) != (n,) for column in (ids, labels, clusters)):
        raise ValueError(f"expected (N, 2) points and N ids, labels, clusters; got {points.shape}, "
                         f"{np.shape(ids)}, {np.shape(labels)}, {np.shape(clusters)}")
    clusters = np.asarray(clusters, dtype=np.int64)
    return {"model": model, "classes": [str(c) for c in classes],
            "clusters": int(clusters.max()) + 1 if n else 0,
            "id": [str(i) for i in ids], "x": np.round(points[:, 0], 3).tolist(),
            "y": np.round(points[:, 1], 3).tolist(), "label": np.asarray(labels, dtype=np.int64).tolist(),
            "cluster": clusters.tolist()}


def write_tsne_map(path: str | os.PathLike, document: dict[str, Any]) -> Path:
    """Write ``map.json`` atomically, without indentation (10,000 points are about 0.5 MB so)."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, separators=(",", ":"))
    return Path(path)


def write_embeddings_csv(path: str | os.PathLike,
                         blocks: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Path:
    """Write ``embeddings.csv`` atomically: columns ``id, label, model, e0 .. e{D-1}``.

    ``blocks``: (model name, ids (N,), labels (N,), embeddings (N, D)); models of different D share
    the file, the header is as wide as the widest and shorter rows leave the rest empty.
    """
    blocks = list(blocks)
    width = max((emb.shape[1] for _, _, _, emb in blocks), default=0)
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "model", *(f"e{i}" for i in range(width))])
        for model, ids, labels, embeddings in blocks:
            for row_id, label, vector in zip(ids, labels, embeddings, strict=True):
                writer.writerow([row_id, int(label), model, *(f"{x:.6g}" for x in vector)])
    return Path(path)
