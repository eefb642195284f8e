import numpy as np
import pytest

from lib.clustering import cluster_embeddings, cluster_scores, contingency_table, kmeans, purity, tsne_2d
from lib.errors import UserError


def test_purity_on_a_hand_table():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    clusters = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 0])
    # cluster 0 = classes {0, 0, 2} -> 2; cluster 1 = {0, 1, 1, 1} -> 3; cluster 2 = {2, 2, 2} -> 3
    assert contingency_table(labels, clusters).tolist() == [[2, 0, 1], [1, 3, 0], [0, 0, 3]]
    assert purity(labels, clusters) == pytest.approx(8 / 10)
    # one cluster holding everything: the largest class's share
    assert purity(labels, np.zeros(10, int)) == pytest.approx(4 / 10)


def test_nmi_ari_purity_on_hand_partitions():
    labels = np.array([0, 0, 1, 1])
    # the same partition under other names: perfect on every score
    assert cluster_scores(labels, np.array([5, 5, 3, 3])) == pytest.approx({"nmi": 1.0, "ari": 1.0, "purity": 1.0})
    # each cluster holds one item of each class: no mutual information; ARI by hand:
    # sum C(n_ij, 2) = 0, sum C(a_i, 2) = sum C(b_j, 2) = 2, expected = 2 * 2 / C(4, 2) = 2/3,
    # ARI = (0 - 2/3) / (2 - 2/3) = -1/2; purity = (1 + 1) / 4
    assert cluster_scores(labels, np.array([0, 1, 0, 1])) == pytest.approx({"nmi": 0.0, "ari": -0.5, "purity": 0.5})


def blobs(rng, n_per_blob, n_blobs, dim, spread):
    centres = rng.normal(size=(n_blobs, dim)) * 5
    labels = np.repeat(np.arange(n_blobs), n_per_blob)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_kmeans_recovers_well_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    points, labels = blobs(rng, 80, 4, 16, 0.3)
    order = rng.permutation(len(labels))
    points, labels = points[order], labels[order]
    clusters, scores = cluster_embeddings(points, labels, seed=3)
    assert clusters.shape == (320,) and set(clusters.tolist()) == {0, 1, 2, 3}
    assert scores == pytest.approx({"nmi": 1.0, "ari": 1.0, "purity": 1.0})
    assert np.array_equal(kmeans(points, 4, seed=3), clusters)


def test_kmeans_input_errors():
    with pytest.raises(UserError, match="cannot make 5 clusters from 3 embeddings"):
        kmeans(np.eye(3), 5)
    with pytest.raises(UserError, match="at least two classes"):
        cluster_embeddings(np.eye(3), np.zeros(3, int))


def test_tsne_keeps_separated_blobs_apart():
    rng = np.random.default_rng(1)
    points, labels = blobs(rng, 50, 3, 20, 0.5)
    mapped = tsne_2d(points, seed=0, n_jobs=1)
    assert mapped.shape == (150, 2) and mapped.dtype == np.float32 and np.isfinite(mapped).all()
    # every point's 5 nearest 2-D neighbours come from its own blob, and blobs are far apart
    distances = np.linalg.norm(mapped[:, None] - mapped[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, :5]
    assert (labels[nearest] == labels[:, None]).all()
    centres = np.stack([mapped[labels == c].mean(axis=0) for c in range(3)])
    radius = max(np.linalg.norm(mapped[labels == c] - centres[c], axis=1).mean() for c in range(3))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert min(gaps) > 2 * radius
    assert np.array_equal(tsne_2d(points, seed=0, n_jobs=1), mapped)  # seeded: the same map again


def test_tsne_on_tiny_inputs_lowers_perplexity():
    rng = np.random.default_rng(2)
    mapped = tsne_2d(rng.normal(size=(12, 5)), n_jobs=1)
    assert mapped.shape == (12, 2) and np.isfinite(mapped).all()
