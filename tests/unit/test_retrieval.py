import numpy as np
import pytest

from lib.errors import UserError
from lib.retrieval import protocols
from lib.retrieval.index import drop_self_matches, gpu_available, knn, l2_normalize
from lib.retrieval.metrics import (
    average_precision_at_k,
    average_precision_at_r,
    knn_accuracy,
    knn_predict,
    map_at_k,
    map_at_r,
    precision_at_k,
    recall_at_k,
    relevant_counts,
)
from lib.retrieval.protocols import evaluate_protocols, linear_probe

# A 6x5 kNN label table, nearest first, the query itself already excluded.
QUERY_LABELS = np.array([0, 0, 1, 1, 2, 2])
NEIGHBOUR_LABELS = np.array([
    [0, 0, 0, 0, 0],  # rel 11111: P@5 5/5; AP@5 = (1 + 1 + 1 + 1 + 1) / 5       = 1
    [1, 0, 1, 0, 0],  # rel 01011: P@5 3/5; AP@5 = (1/2 + 2/4 + 3/5) / 5         = 0.32
    [1, 2, 2, 2, 2],  # rel 10000: P@5 1/5; AP@5 = (1/1) / 5                     = 0.2
    [2, 2, 2, 2, 1],  # rel 00001: P@5 1/5; AP@5 = (1/5) / 5                     = 0.04
    [0, 1, 0, 1, 0],  # rel 00000: P@5 0;   AP@5                                 = 0
    [2, 2, 0, 0, 2],  # rel 11001: P@5 3/5; AP@5 = (1/1 + 2/2 + 3/5) / 5         = 0.52
])
# mAP@5 = (1 + 0.32 + 0.2 + 0.04 + 0 + 0.52) / 6 = 2.08 / 6; P@5 = (5+3+1+1+0+3) / 30 = 13/30
# P@1 = first column relevant for queries 0, 2, 5 = 3/6; recall@5: all but query 4 = 5/6
# 5-NN votes: 0 (5 of 5) right, 0 (3 of 5) right, 2 wrong, 2 wrong, 0 wrong, 2 (3 of 5) right -> 3/6


def test_precision_and_average_precision_on_the_hand_table():
    assert precision_at_k(NEIGHBOUR_LABELS, QUERY_LABELS, 5) == pytest.approx(13 / 30)
    assert precision_at_k(NEIGHBOUR_LABELS, QUERY_LABELS, 1) == pytest.approx(3 / 6)
    assert average_precision_at_k(NEIGHBOUR_LABELS, QUERY_LABELS, 5) == pytest.approx([1, 0.32, 0.2, 0.04, 0, 0.52])
    assert map_at_k(NEIGHBOUR_LABELS, QUERY_LABELS, 5) == pytest.approx(2.08 / 6)
    # AP@2: query 1 rel 01 -> (1/2)/2; query 5 rel 11 -> (1 + 1)/2; queries 0 and 2 -> 1 and 1/2
    assert map_at_k(NEIGHBOUR_LABELS, QUERY_LABELS, 2) == pytest.approx((1 + 0.25 + 0.5 + 0 + 0 + 1) / 6)
    # the denominator is k: a lone relevant item at rank 1 gives 1/k, not 1
    assert average_precision_at_k(np.array([[7, 0, 0]]), np.array([7]), 3) == pytest.approx([1 / 3])


def test_recall_and_knn_accuracy_on_the_hand_table():
    assert recall_at_k(NEIGHBOUR_LABELS, QUERY_LABELS, 5) == pytest.approx(5 / 6)
    assert recall_at_k(NEIGHBOUR_LABELS, QUERY_LABELS, 1) == pytest.approx(3 / 6)
    assert knn_predict(NEIGHBOUR_LABELS, 5).tolist() == [0, 0, 2, 2, 0, 2]
    assert knn_accuracy(NEIGHBOUR_LABELS, QUERY_LABELS, 5) == pytest.approx(3 / 6)


def test_knn_vote_ties_go_to_the_label_seen_nearest():
    table = np.array([
        [3, 1, 1, 3, 2],  # 3 and 1 have two votes each; 3 ranks first
        [1, 3, 3, 1, 2],  # the same votes, 1 ranks first
        [2, 0, 1, 4, 3],  # five labels with one vote each: the nearest
        [4, 9, 9, 9, 4],  # no tie: the majority wins although 4 is nearest
    ])
    assert knn_predict(table, 5).tolist() == [3, 1, 2, 9]
    assert knn_predict(np.array([[5, 6, 6, 5, 6]]), 4).tolist() == [5]  # only the first k vote


def test_map_at_r_uses_each_querys_own_r():
    queries = np.array([0, 1, 2, 3])
    table = np.array([
        [0, 1, 0, 0, 1],  # R=3: rel 101 -> (1 + 2/3) / 3 = 5/9 (the 4th column is beyond R)
        [1, 1, 0, 0, 0],  # R=2: rel 11 -> (1 + 1) / 2 = 1
        [0, 2, 2, 0, 2],  # R=4: rel 0110 -> (1/2 + 2/3) / 4 = 7/24
        [0, 0, 0, 0, 0],  # R=0: nothing to retrieve -> undefined, left out of the mean
    ])
    counts = np.array([3, 2, 4, 0])
    per_query = average_precision_at_r(table, queries, counts)
    assert per_query[:3] == pytest.approx([5 / 9, 1, 7 / 24]) and np.isnan(per_query[3])
    assert map_at_r(table, queries, counts) == pytest.approx((5 / 9 + 1 + 7 / 24) / 3)
    with pytest.raises(UserError, match="no query has an item of its class"):
        map_at_r(table[3:], queries[3:], counts[3:])
    with pytest.raises(ValueError, match="needs at least k neighbours"):
        map_at_r(table[:, :3], queries, counts)  # R=4 needs four columns


def test_relevant_counts_with_and_without_self():
    gallery = np.array([0, 0, 1, 2, 2, 2])
    assert relevant_counts(np.array([0, 2, 3]), gallery).tolist() == [2, 3, 0]
    assert relevant_counts(gallery, gallery, exclude_self=True).tolist() == [1, 1, 0, 2, 2, 2]


def test_drop_self_matches_removes_the_own_row_wherever_it_ranks():
    indices = np.array([[3, 0, 5], [1, 2, 4], [0, 1, 2], [4, 5, 6]])
    sims = -indices.astype(np.float32)
    kept_sims, kept = drop_self_matches(sims, indices, np.array([0, 1, 2, 3]))
    # own row at rank 2, rank 1, rank 3; row 3 is missing from the last list, so its last column goes
    assert kept.tolist() == [[3, 5], [2, 4], [0, 1], [4, 5]]
    assert np.array_equal(kept_sims, -kept.astype(np.float32))


def random_unit(rng, n, d):
    return l2_normalize(rng.normal(size=(n, d)))


def test_faiss_neighbours_match_brute_force_numpy():
    rng = np.random.default_rng(0)
    gallery, queries = random_unit(rng, 400, 24), random_unit(rng, 60, 24)
    sims, indices = knn(queries, gallery, 7, use_gpu=False)
    brute = queries @ gallery.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :7]
    assert indices.dtype == np.int64 and np.array_equal(indices, expected)
    assert np.allclose(sims, np.take_along_axis(brute, expected, axis=1), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()  # most similar first


def test_exclude_self_matches_brute_force_and_survives_duplicates():
    rng = np.random.default_rng(1)
    points = random_unit(rng, 200, 16)
    points[1] = points[0]  # an exact duplicate ties with the query itself
    sims, indices = knn(points, points, 5, exclude_self=True, use_gpu=False)
    brute = points @ points.T
    np.fill_diagonal(brute, -np.inf)
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :5]
    assert (indices != np.arange(200)[:, None]).all()
    assert indices[0, 0] == 1 and indices[1, 0] == 0  # the duplicate stays, the query itself goes
    assert np.allclose(sims, np.take_along_axis(brute, expected, axis=1), atol=1e-5)
    untied = ~np.isin(expected, [0, 1]).any(axis=1)  # rows 0 and 1 tie in other queries' lists: any order
    assert untied.sum() > 150 and np.array_equal(indices[untied], expected[untied])


def test_search_errors_are_user_errors():
    rng = np.random.default_rng(2)
    points = random_unit(rng, 10, 4)
    with pytest.raises(UserError, match="cannot retrieve k=10 neighbours from a gallery of 10 items"):
        knn(points, points, 10, exclude_self=True, use_gpu=False)
    with pytest.raises(UserError, match="3 dimensions but the gallery has 4"):
        knn(points[:, :3], points, 2, use_gpu=False)
    with pytest.raises(UserError, match="--use-gpu must be auto, true or false"):
        knn(points, points, 2, use_gpu="sometimes")


@pytest.mark.skipif(gpu_available(), reason="exact search can use a GPU here")
def test_insisting_on_a_gpu_without_one_is_a_user_error():
    points = random_unit(np.random.default_rng(3), 10, 4)
    with pytest.raises(UserError, match="--use-gpu true, but this process has no GPUs"):
        knn(points, points, 2, use_gpu=True)


def class_blobs(rng, sizes, n_classes, dim, spread):
    """Splits of unit vectors around one random direction per class (shared by the splits), one
    (embeddings, labels) pair per entry of ``sizes`` (items per class); ``spread`` sets the overlap."""
    centres = random_unit(rng, n_classes, dim)
    splits = []
    for n_per_class in sizes:
        labels = np.repeat(np.arange(n_classes), n_per_class)
        noise = spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
        splits.append((l2_normalize(centres[labels] + noise), labels))
    return splits


def test_protocols_report_exactly_the_design_keys_and_agree_with_the_metric_functions():
    rng = np.random.default_rng(4)
    (train, train_labels), (test, test_labels) = class_blobs(rng, (60, 25), 4, 16, 1.5)
    results = evaluate_protocols(train, train_labels, test, test_labels, use_gpu=False)
    assert set(results) == {"L", "G"}
    for protocol in results.values():
        assert set(protocol) == {"map@5", "p@5", "p@1", "map@r", "recall@5", "knn_acc"}
        assert all(0.0 <= value <= 1.0 for value in protocol.values())

    _, leave_one_out = knn(test, test, 24, exclude_self=True, use_gpu=False)  # R = 25 - 1
    table = test_labels[leave_one_out]
    assert results["L"]["map@5"] == pytest.approx(map_at_k(table, test_labels, 5))
    assert results["L"]["p@1"] == pytest.approx(precision_at_k(table, test_labels, 1))
    assert results["L"]["map@r"] == pytest.approx(map_at_r(table, test_labels, np.full(100, 24)))
    assert results["L"]["knn_acc"] == pytest.approx(knn_accuracy(table, test_labels, 5))
    _, against_train = knn(test, train, 60, use_gpu=False)  # R = 60 per class
    table = train_labels[against_train]
    assert results["G"]["p@5"] == pytest.approx(precision_at_k(table, test_labels, 5))
    assert results["G"]["recall@5"] == pytest.approx(recall_at_k(table, test_labels, 5))
    assert results["G"]["map@r"] == pytest.approx(map_at_r(table, test_labels, np.full(100, 60)))


def test_map_at_r_matches_a_full_sort_and_chunking_changes_nothing(monkeypatch):
    rng = np.random.default_rng(5)
    (train, train_labels), (test, test_labels) = class_blobs(rng, (40, 20), 3, 8, 3.0)
    keep = rng.permutation(len(train_labels))[:100]  # unequal R per class
    train, train_labels = train[keep], train_labels[keep]
    whole = evaluate_protocols(train, train_labels, test, test_labels, use_gpu=False)

    order = np.argsort(-(test @ train.T), axis=1, kind="stable")
    scores = []
    for q, label in enumerate(test_labels):
        relevant = train_labels[order[q]] == label
        r = relevant.sum()
        hits = np.cumsum(relevant[:r])
        scores.append(sum(hits[i] / (i + 1) for i in range(r) if relevant[i]) / r)
    assert whole["G"]["map@r"] == pytest.approx(np.mean(scores))

    monkeypatch.setattr(protocols, "CHUNK_ENTRIES", 7)  # one query per chunk
    chunked = evaluate_protocols(train, train_labels, test, test_labels, use_gpu=False)
    for name in ("L", "G"):
        assert chunked[name] == pytest.approx(whole[name])


def test_separated_classes_score_one_and_scale_does_not_matter():
    rng = np.random.default_rng(6)
    (train, train_labels), (test, test_labels) = class_blobs(rng, (30, 10), 3, 12, 0.05)
    results = evaluate_protocols(train * 3.0, train_labels, test * 0.2, test_labels, use_gpu=False)
    assert all(value == pytest.approx(1.0) for protocol in results.values() for value in protocol.values())


def test_linear_probe_fits_on_train_only():
    rng = np.random.default_rng(7)
    (train, train_labels), (test, test_labels) = class_blobs(rng, (50, 20), 3, 10, 0.5)
    train_acc, test_acc = linear_probe(train, train_labels, test, test_labels)
    assert train_acc > 0.95 and test_acc > 0.9
    poisoned_train_acc, poisoned_test_acc = linear_probe(train, train_labels, test, rng.permutation(test_labels))
    assert poisoned_train_acc == train_acc and poisoned_test_acc < test_acc
