"""jobs.compare over hand-made metrics.json files: side-by-side values, seed spreads and the regression gate."""

import json
import statistics

import pytest

from jobs import compare
from lib.compare import GATED, find_drops, load_side


def write_run(root, name, maps, nmi=0.3):
    """A run whose metrics.json gives each model ``maps[model]`` as every retrieval figure (mAP@5, P@5, ...)."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    models, clusters = {}, {}
    for model, value in maps.items():
        protocol = {"map@5": value, "p@5": value + 0.1, "p@1": value, "map@r": value / 2, "recall@5": 1.0,
                    "knn_acc": value}
        models[model] = {"L": dict(protocol), "G": dict(protocol), "train_acc": 0.9, "test_acc": 0.5,
                         "knn_acc": value}
        clusters[model] = {"nmi": nmi, "ari": 0.1, "purity": 0.4}
    (run / "eval" / "metrics.json").write_text(json.dumps({"models": models, "clusters": clusters, "config": {}}))
    return str(run)


def test_a_side_of_several_seeds_holds_their_mean_and_sample_spread(tmp_path):
    runs = [write_run(tmp_path, f"s{i}", {"resnet50": v, "vgg16": 0.2}) for i, v in enumerate((0.40, 0.44, 0.48))]
    side = load_side(",".join(runs))
    assert side.mean("resnet50", "mAP@5 L") == pytest.approx(0.44)
    assert side.spread("resnet50", "mAP@5 L") == pytest.approx(statistics.stdev([0.40, 0.44, 0.48]))  # 0.04
    assert side.mean("resnet50", "MAP@R G") == pytest.approx(0.22)
    assert side.spread("vgg16", "NMI") == pytest.approx(0.0)
    assert load_side(runs[0]).spread("resnet50", "mAP@5 L") is None


def test_the_gate_takes_the_threshold_or_the_seed_spread_whichever_is_larger(tmp_path):
    before = load_side(write_run(tmp_path, "a", {"resnet50": 0.50, "vgg16": 0.30}))
    after = load_side(write_run(tmp_path, "b", {"resnet50": 0.47, "vgg16": 0.295}))
    drops = find_drops(before, after, threshold=0.01)
    assert {(d.model, d.metric) for d in drops} == {("resnet50", metric) for metric in GATED}
    assert drops[0].amount == pytest.approx(0.03) and "0.500 -> 0.470" in drops[0].describe()
    assert find_drops(before, after, threshold=0.05) == []
    # seeds: resnet50 falls 0.03 on average, inside a spread of 0.04 -> not a regression
    earlier = load_side(",".join(write_run(tmp_path, f"e{i}", {"resnet50": v}) for i, v in enumerate((0.46, 0.50, 0.54))))
    later = load_side(",".join(write_run(tmp_path, f"l{i}", {"resnet50": v}) for i, v in enumerate((0.43, 0.47, 0.51))))
    assert find_drops(earlier, later, threshold=0.01) == []
    assert find_drops(earlier, later, threshold=0.0) == []
    better = load_side(write_run(tmp_path, "c", {"resnet50": 0.60, "vgg16": 0.40}))
    assert find_drops(before, better, threshold=0.0) == []


def test_the_job_prints_the_table_writes_the_picture_and_gates(tmp_path, capsys):
    a = write_run(tmp_path, "a", {"resnet50": 0.50, "stacked": 0.55})
    b = write_run(tmp_path, "b", {"resnet50": 0.45, "stacked": 0.56, "vgg16": 0.2})
    out = tmp_path / "cmp"
    assert compare.cli([a, b, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## resnet50" in printed and "## stacked" in printed and "## vgg16" not in printed  # common models only
    assert "| mAP@5 L | 0.500 | 0.450 | -0.050 |" in printed
    assert (out / "compare.md").read_text().startswith("# Run comparison")
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert compare.cli([a, b, "--out-dir", str(out), "--fail-on-drop", "0.02"]) == 1
    error = capsys.readouterr().err
    assert "resnet50 mAP@5 L fell 0.500 -> 0.450" in error and "stacked" not in error
    assert compare.cli([a, b, "--out-dir", str(out), "--fail-on-drop", "0.1"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["ONE"], "give at least two runs"),
    (["A", "B", "--fail-on-drop", "nan"], "--fail-on-drop: expected a finite number, got nan"),
    (["A", "B", "--fail-on-drop", "-1"], "--fail-on-drop must be a finite number"),
])
def test_bad_command_lines_are_one_line_and_exit_2(argv, message, capsys):
    assert compare.cli(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_run_without_an_evaluation_is_named(tmp_path, capsys):
    a = write_run(tmp_path, "a", {"resnet50": 0.5})
    (tmp_path / "empty").mkdir()
    assert compare.cli([a, str(tmp_path / "empty"), "--out-dir", str(tmp_path / "cmp")]) == 2
    error = capsys.readouterr().err
    assert "no evaluation in" in error and "metrics.json is missing" in error
    assert not (tmp_path / "cmp").exists()  # nothing written before the inputs are read
