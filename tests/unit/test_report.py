"""lib.report: the metrics.json layout, the results.md table, subsets and the CSV export."""

import csv

import numpy as np
import pytest

from lib.report import (
    best_model,
    grid_query_rows,
    metrics_document,
    model_entry,
    results_markdown,
    seeded_subset,
    write_embeddings_csv,
)


def protocols(map5, p5=0.5):
    one = {"p@1": 0.6, "p@5": p5, "map@5": map5, "recall@5": 0.9, "map@r": 0.3, "knn_acc": 0.55}
    return {"L": {**one, "map@5": map5 - 0.1}, "G": one}


def test_model_entry_takes_knn_accuracy_from_protocol_g_and_keeps_extras():
    entry = model_entry(protocols(0.4), train_acc=0.9, test_acc=0.7, stacking_classifier={"train_acc": 1.0})
    assert entry["knn_acc"] == 0.55 and entry["train_acc"] == 0.9 and entry["test_acc"] == 0.7
    assert entry["L"]["map@5"] == pytest.approx(0.3) and entry["G"]["map@5"] == 0.4
    assert entry["stacking_classifier"] == {"train_acc": 1.0}
    with pytest.raises(ValueError, match="protocol L lacks map@5, p@5, map@r, knn_acc"):
        model_entry({"L": {"p@1": 1}, "G": protocols(0.4)["G"]}, 0, 0)


def test_metrics_document_has_exactly_the_design_keys():
    models = {"a": model_entry(protocols(0.4), 0.9, 0.7), "b": model_entry(protocols(0.5), 0.8, 0.6)}
    clusters = {name: {"nmi": 0.1, "ari": 0.2, "purity": 0.3} for name in models}
    doc = metrics_document(models, clusters, {"seed": 0})
    assert set(doc) == {"models", "clusters", "config"}
    for name in ("a", "b"):
        assert {"L", "G", "train_acc", "test_acc", "knn_acc"} <= set(doc["models"][name])
        for protocol in ("L", "G"):
            assert {"map@5", "p@5", "p@1", "map@r"} <= set(doc["models"][name][protocol])
        assert doc["clusters"][name] == {"nmi": 0.1, "ari": 0.2, "purity": 0.3}
    with pytest.raises(ValueError, match="differ"):
        metrics_document(models, {"a": clusters["a"]}, {})
    with pytest.raises(ValueError, match="lacks train_acc"):
        metrics_document({"a": {"L": {}, "G": {}}}, {"a": clusters["a"]}, {})


def test_best_model_ranks_by_protocol_g_map_at_5_among_candidates():
    models = {"a": model_entry(protocols(0.4), 0, 0), "b": model_entry(protocols(0.6), 0, 0),
              "stacked": model_entry(protocols(0.7), 0, 0)}
    assert best_model(models) == "stacked"
    assert best_model(models, ["a", "b"]) == "b"


def test_results_table_has_one_row_per_model_and_names_every_protocol():
    models = {"resnet50": model_entry(protocols(0.4), 0.91, 0.71),
              "stacked": model_entry(protocols(0.5), 0.95, 0.75,
                                     stacking_classifier={"train_acc": 0.99, "test_acc": 0.77})}
    clusters = {name: {"nmi": 0.123, "ari": 0.2, "purity": 0.3} for name in models}
    text = results_markdown(metrics_document(models, clusters, {}), notes=["weights: none"])
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert "mAP@5 L" in header and "P@5 G" in header and "probe" in header and "MAP@R G" in header
    rows = [line for line in lines if line.startswith("| resnet50") or line.startswith("| stacked")]
    assert len(rows) == 2
    assert rows[0].split("|")[1:-1] == [" resnet50 ", " 0.910 ", " 0.710 ", " 0.550 ", " 0.300 ", " 0.500 ",
                                        " 0.400 ", " 0.500 ", " 0.600 ", " 0.300 ", " 0.123 "]
    assert "leave-one-out" in text and "train gallery" in text
    assert "test acc 0.770" in text and lines[-1] == "weights: none"


def test_seeded_subset_is_sorted_reproducible_and_capped():
    rows = seeded_subset(100, 10, seed=3)
    assert len(rows) == 10 and np.all(np.diff(rows) > 0) and np.array_equal(rows, seeded_subset(100, 10, seed=3))
    assert np.array_equal(seeded_subset(5, 10), np.arange(5)) and np.array_equal(seeded_subset(5, 0), np.arange(5))


def test_grid_query_rows_take_the_classes_in_turn():
    labels = np.array([0, 0, 0, 1, 1, 2])
    rows = grid_query_rows(labels, 5, seed=0)
    assert list(labels[rows]) == [0, 1, 2, 0, 1]
    assert len(set(rows.tolist())) == 5
    assert sorted(grid_query_rows(labels, 50).tolist()) == list(range(6))


def test_the_default_retrieval_grid_shows_every_class_of_cifar10():
    from lib.evaluation import EvaluateConfig

    labels = np.repeat(np.arange(10), 50)
    rows = grid_query_rows(labels, EvaluateConfig(data_dir="DATA", run_dir="RUN").grid_queries, seed=0)
    assert sorted(labels[rows].tolist()) == list(range(10))


def test_embeddings_csv_layout(tmp_path):
    path = write_embeddings_csv(tmp_path / "e.csv", [
        ("a", np.array(["x", "y"]), np.array([0, 1]), np.array([[0.5, -0.25], [1.0, 0.0]], np.float32)),
        ("b", np.array(["x"]), np.array([0]), np.array([[0.125]], np.float32)),
    ])
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["id", "label", "model", "e0", "e1"]
    assert rows[1] == ["x", "0", "a", "0.5", "-0.25"] and rows[3] == ["x", "0", "b", "0.125"]
    assert not list(tmp_path.glob(".*.tmp"))
