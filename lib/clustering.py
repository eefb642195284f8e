"""Clusters of embeddings: K-Means, its agreement with the classes, and t-SNE.

Everything takes and returns arrays; :mod:`lib.plots` draws them. K-Means runs on the
L2-normalised embeddings (the geometry retrieval uses); NMI and ARI come from scikit-learn, purity
is computed here.
"""

from __future__ import annotations

import numpy as np

from lib.errors import UserError
from lib.retrieval.index import drop_self_matches, l2_normalize

# t-SNE settings (openTSNE). Perplexity 30 and the 250 + 500 iteration schedule with early
# exaggeration 12 are openTSNE's defaults. The FFT grid's floor is lowered from openTSNE's 50
# intervals per axis to 20: while the map is still small (early exaggeration) the floor sets the grid,
# and the numpy FFT on it dominates each iteration. Measured on 10k x 128 (benchmarks.tsne's
# tsne suite): a quarter less time, the same kNN preservation and trustworthiness as the default
# and as scikit-learn's TSNE. Coarser grids (2 map units per interval) lost neighbour preservation.
# Iterations after the exaggeration phase: the map keeps expanding, so each late iteration costs more (a
# larger FFT grid). Measured on the same data: iterations 375-500 took 8.7 of the 18 s, lowered the KL
# divergence by 0.8 % (4.222 -> 4.190) and left trustworthiness@10 and 2-D class kNN accuracy unchanged.
PERPLEXITY = 30.0
EARLY_EXAGGERATION_ITERATIONS = 250
EARLY_EXAGGERATION = 12.0
ITERATIONS = 375
MIN_INTERVALS = 20
INTS_IN_INTERVAL = 1.0


def kmeans(embeddings: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 3) -> np.ndarray:
    """Cluster ids (N,) int64 in [0, n_clusters) for ``embeddings`` (N, D), L2-normalised here.

    scikit-learn's K-Means (Lloyd, k-means++ starts), seeded; the lowest-inertia of ``n_init`` runs
    is kept. Chosen over faiss's K-Means by measurement at 10k x 128, 10 clusters: both take well under
    a second, and per run k-means++ starts reach a lower inertia than faiss's random starts
    (one sklearn run beat three faiss restarts on overlapping classes).
    """
    from sklearn.cluster import KMeans

    points = l2_normalize(embeddings)
    if not 1 <= n_clusters <= len(points):
        raise UserError(f"cannot make {n_clusters} clusters from {len(points)} embeddings")
    model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed)
    return model.fit_predict(points).astype(np.int64)


def contingency_table(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """(n_clusters_present, n_classes_present) counts: row c, column y = points of class y in cluster c."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"expected two equal (N,) arrays, got {labels.shape} and {clusters.shape}")
    _, class_index = np.unique(labels, return_inverse=True)
    _, cluster_index = np.unique(clusters, return_inverse=True)
    table = np.zeros((cluster_index.max() + 1, class_index.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_index, class_index), 1)
    return table


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Purity = (1/N) * sum over clusters c of max over classes y of |c ∩ y|.

    Each cluster is credited with its most frequent class; purity is the share of points that
    belong to their cluster's majority class. 1 for a perfect clustering; it rewards many small
    clusters, so read it next to NMI and ARI. ``labels`` and ``clusters`` are (N,) integer arrays.
    """
    table = contingency_table(labels, clusters)
    return float(table.max(axis=1).sum() / table.sum())


def cluster_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """``{"nmi", "ari", "purity"}`` of cluster ids (N,) against true labels (N,).

    NMI is scikit-learn's ``normalized_mutual_info_score`` (arithmetic mean normalisation), ARI its
    ``adjusted_rand_score`` (0 for chance, 1 for identical partitions).
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    return {"nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters)),
            "purity": purity(labels, clusters)}


def cluster_embeddings(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[str, float]]:
    """K-Means with k = the number of classes in ``labels``; returns cluster ids (N,) and their scores."""
    labels = np.asarray(labels)
    n_classes = len(np.unique(labels))
    if n_classes < 2:
        raise UserError("clustering scores need at least two classes")
    clusters = kmeans(embeddings, n_classes, seed=seed)
    return clusters, cluster_scores(labels, clusters)


def tsne_2d(embeddings: np.ndarray, perplexity: float = PERPLEXITY, seed: int = 0, n_jobs: int = -1) -> np.ndarray:
    """A 2-D t-SNE map (N, 2) float32 of ``embeddings`` (N, D), L2-normalised here.

    openTSNE's FFT-accelerated t-SNE on exact neighbours: faiss finds the 3 * perplexity nearest
    neighbours (openTSNE's own approximate search is slower here and inexact), openTSNE turns them
    into perplexity-calibrated affinities and optimises from a PCA start (so a seed gives the same
    map). Perplexity is lowered for tiny inputs, where fewer than 3 * perplexity neighbours exist.
    """
    import faiss
    from openTSNE import TSNEEmbedding, affinity, initialization
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    points = l2_normalize(embeddings)
    n = len(points)
    if n < 4:
        raise UserError(f"t-SNE needs at least 4 points, got {n}")
    n_neighbours = int(min(round(3 * perplexity), n - 1))
    perplexity = min(perplexity, n_neighbours / 3)
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(points)
    squared, neighbours = index.search(points, n_neighbours + 1)
    # column 0 is normally the point itself, but with duplicate points it can rank lower
    squared, neighbours = drop_self_matches(squared, neighbours, np.arange(n))
    distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float64)
    affinities = affinity.PerplexityBasedNN(
        perplexity=perplexity, knn_index=PrecomputedNeighbors(neighbours.astype(np.int64), distances),
        n_jobs=n_jobs, random_state=seed)
    start = initialization.pca(points, random_state=seed)
    embedding = TSNEEmbedding(start, affinities, n_jobs=n_jobs, random_state=seed,
                              min_num_intervals=MIN_INTERVALS, ints_in_interval=INTS_IN_INTERVAL)
    embedding = embedding.optimize(EARLY_EXAGGERATION_ITERATIONS, exaggeration=EARLY_EXAGGERATION,
                                   momentum=0.5)
    embedding = embedding.optimize(ITERATIONS, momentum=0.8)
    return np.asarray(embedding, dtype=np.float32)
