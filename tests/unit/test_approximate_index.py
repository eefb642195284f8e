"""The approximate gallery indexes (lib.retrieval.approximate): recall against exact search, the tuned search
parameter, a full answer for every query, and --index auto's choice."""

import numpy as np
import pytest

from benchmarks.common import class_structured_unit_vectors
from lib.retrieval.approximate import (
    AUTO_APPROXIMATE,
    AUTO_EXACT_BELOW,
    build_index,
    build_tuned_index,
    ivf_lists,
    ivf_probe_ladder,
    recall_at_k,
    resolve_index_kind,
    search_full,
)
from lib.retrieval.index import knn


def test_recall_at_k_of_a_hand_table():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 9], [4, 5, 6]])  # two of three, then all three
    assert recall_at_k(found, exact) == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError):
        recall_at_k(found[:, :2], exact)


def test_auto_picks_exact_search_below_the_measured_size_and_the_lists_grow_with_the_gallery():
    assert resolve_index_kind("auto", AUTO_EXACT_BELOW - 1) == "exact"
    assert resolve_index_kind("auto", AUTO_EXACT_BELOW) == AUTO_APPROXIMATE
    assert resolve_index_kind("hnsw", 10) == "hnsw"
    assert (ivf_lists(1_000_000), ivf_lists(5_000_000), ivf_lists(100)) == (2048, 4096, 2)
    assert ivf_lists(30) == 1  # too few rows to train two cells
    assert ivf_probe_ladder(50) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 50] and ivf_probe_ladder(4) == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def vectors():
    gallery, _, centres = class_structured_unit_vectors(2000, 32, seed=1)
    queries, _, _ = class_structured_unit_vectors(400, 32, seed=2, centres=centres)
    return gallery, queries[:200], queries[200:]


def test_an_ivf_index_tuned_to_recall_1_answers_like_exact_search(vectors):
    gallery, tune, report = vectors
    built = build_tuned_index(gallery, "ivf", tune, report, target=1.0)
    nlist = built.parameters["nlist"]
    assert nlist == ivf_lists(2000) and built.tried[-1]["recall@5"] == 1.0
    assert [row["nprobe"] for row in built.tried] == ivf_probe_ladder(nlist)[:len(built.tried)]
    assert built.recall == 1.0
    assert np.array_equal(search_full(built.index, "ivf", report, 5)[1], knn(report, gallery, 5, use_gpu=False)[1])


def test_a_tuned_hnsw_index_reaches_the_recall_it_was_tuned_to_on_other_queries(vectors):
    gallery, tune, report = vectors
    built = build_tuned_index(gallery, "hnsw", tune, report, target=0.9)
    assert built.tried[-1]["recall@5"] >= 0.9 and built.parameters["efSearch"] == built.tried[-1]["efSearch"]
    assert all(row["recall@5"] < 0.9 for row in built.tried[:-1])  # the smallest efSearch that reached it
    assert 0.8 <= built.recall <= 1.0 and built.build_s > 0


def test_an_ivf_search_whose_cells_hold_too_few_rows_still_returns_k_gallery_rows(vectors):
    gallery, _, report = vectors
    index = build_index(gallery[:200], "ivf")  # 5 cells of about 40 rows
    index.nprobe = 1
    assert (index.search(report, 60)[1] < 0).any()  # faiss alone pads with -1
    similarities, rows = search_full(index, "ivf", report, 60)
    assert (rows >= 0).all() and (np.diff(similarities, axis=1) <= 1e-6).all()
