"""The benchmark suites that need no Ray, run on tiny inputs with their real code: every side computes the same
answer, every reported time and ratio is a finite positive number, and the summary line reads the result.
Timings are never asserted against a threshold (a busy machine moves them)."""

from __future__ import annotations

import math

import numpy as np

from benchmarks import retrieval, tsne
from benchmarks.common import class_structured_unit_vectors, interleave


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_interleave_calls_each_side_in_turn_and_times_every_call():
    calls = []
    measured = interleave({"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or 0},
                          rounds=3, warmup=True, keep="last")
    assert calls == ["a", "b"] * 4  # one warm-up each, then three rounds, alternating
    assert [len(measured.wall[side]) for side in "ab"] == [3, 3]
    assert all(seconds >= 0 for side in "ab" for seconds in measured.wall[side] + measured.cpu[side])
    assert measured.values["a"] == [7] and measured.last("b") == 0  # keep="last": the latest value only


def test_class_structured_vectors_are_unit_rows_and_a_second_split_shares_the_classes():
    gallery, labels, centres = class_structured_unit_vectors(500, 16, seed=1)
    queries, query_labels, _ = class_structured_unit_vectors(50, 16, seed=2, centres=centres)
    assert gallery.shape == (500, 16) and gallery.dtype == np.float32 and labels.shape == (500,)
    assert np.allclose(np.linalg.norm(gallery, axis=1), 1, atol=1e-5) and set(labels) <= set(range(10))
    # queries lie nearer their own class centre than any other, most of the time
    assert (np.argmax(queries @ centres.T, axis=1) == query_labels).mean() > 0.5


def test_the_retrieval_suite_on_a_tiny_gallery():
    result = retrieval.measure(rounds=1, n_queries=200, n_gallery=1000, dims=(16, 32), sklearn_queries=20)
    assert result["n_queries"] == 200 and "extrapolated linearly x10 to 200" in result["sklearn_note"]
    for dim in (16, 32):
        row = result[f"dim_{dim}"]
        assert set(row) == {
            "project_s", "project_cpu_s", "bare_faiss_s", "bare_faiss_cpu_s", "sklearn_loop_s_extrapolated",
            "sklearn_loop_cpu_s_extrapolated", "map@5_project", "map@5_bare_faiss", "map@5_sklearn_subset",
            "map@5_project_same_subset", "ratio_project_over_bare_faiss", "ratio_project_over_bare_faiss_cpu",
            "ratio_sklearn_loop_over_project"}
        # the three ways compute one number (unit vectors: cosine and Euclidean rank alike)
        assert row["map@5_project"] == row["map@5_bare_faiss"]
        assert abs(row["map@5_sklearn_subset"] - row["map@5_project_same_subset"]) < 1e-4
        assert 0 < row["map@5_project"] <= 1
        for key in ("project_s", "bare_faiss_s", "sklearn_loop_s_extrapolated", "ratio_project_over_bare_faiss",
                    "ratio_sklearn_loop_over_project"):
            assert positive(row[key]), (key, row[key])
    line = retrieval.summary(result)
    assert line.startswith("16-d project/bare faiss ") and "; 32-d project/bare faiss " in line


def test_the_tsne_suite_on_a_tiny_set():
    result = tsne.measure(rounds=1, n=200, dim=16)
    assert (result["n"], result["dim"], result["rounds"]) == (200, 16, 1)
    for side in ("project", "sklearn"):
        assert set(result[side]) == {"wall_s", "cpu_s", "knn_preservation@10", "trustworthiness@10",
                                     "class_knn_acc_2d"}
        assert positive(result[side]["wall_s"])
        for key in ("knn_preservation@10", "trustworthiness@10", "class_knn_acc_2d"):
            assert 0 < result[side][key] <= 1, (side, key, result[side][key])
    assert 0 < result["class_knn_acc_high_dim"] <= 1
    assert positive(result["speedup_wall"]) and positive(result["speedup_cpu"])
    assert tsne.summary(result).startswith("200 points, project ")


def test_neighbour_preservation_of_a_map_that_keeps_every_neighbour():
    points = np.random.default_rng(0).normal(size=(60, 2)).astype(np.float32)
    assert tsne.neighbour_preservation(points, points * 3.0) == 1.0
    shuffled = points[np.random.default_rng(1).permutation(60)]
    assert tsne.neighbour_preservation(points, shuffled) < 0.5


def test_the_scale_suite_on_two_tiny_galleries_skips_an_hnsw_build_over_its_budget(tmp_path):
    from benchmarks import scale

    result = scale.measure(sizes=(1000, 1500), latency_queries=10, build_budget_s=1e-3, work=tmp_path)
    small, large = result["1000"], result["1500"]
    assert small["exact"]["recall@5"] == 1.0 and small["exact"]["parameters"] == {}
    for row in (small["exact"], small["ivf"], small["hnsw"], large["exact"], large["ivf"]):
        assert positive(row["p50_ms"]) and row["p99_ms"] >= row["p50_ms"] and positive(row["file_bytes"])
        assert 0 < row["recall@5"] <= 1
    # each approximate index was tuned to the target on the tuning queries; the reported recall is on others
    for row in (small["ivf"], small["hnsw"], large["ivf"]):
        assert row["tuning"][-1]["recall@5"] >= 0.95 and row["recall@5"] > 0.85
    assert small["ivf"]["parameters"]["nlist"] == 25 and large["ivf"]["parameters"]["nprobe"] <= 37
    # a fresh process that reads the 1,000 x 128 exact index (512 kB of vectors) holds about that much more
    assert 0.5 * small["exact"]["file_bytes"] <= small["exact"]["resident_bytes"] <= 4 * small["exact"]["file_bytes"]
    assert set(large["hnsw"]) == {"not_run"}
    assert large["hnsw"]["not_run"].startswith("not run: the 1,000-row build took ")
    assert large["hnsw"]["not_run"].endswith(" s; 1,500 rows would take more than the 0 s budget")
    assert result["goals_met"] == {"1000000": None, "5000000": None} and not list(tmp_path.iterdir())
    line = scale.summary(result)
    assert line.startswith("1,000 rows: exact p50 ") and line.endswith("hnsw not run")
