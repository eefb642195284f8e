"""jobs.benchmark's command line: bad choices are one line + exit 2 before any work, and every suite
has its summary line (a missing one would fail only after minutes of measuring)."""

from __future__ import annotations

import pytest

from benchmarks.common import SUITE_NAMES
from jobs import benchmark


@pytest.mark.parametrize("argv, message", [
    (["--suites", "prepare,nosuch"], "unknown benchmark suite(s) nosuch"),
    (["--suites", "train", "--epochs", "1"], "--epochs must be at least 2"),
    (["--suites", "tsne", "--rounds", "0"], "--rounds must be at least 1"),
    (["--suites", "embed", "--embed-backbones", "resnet50,alexnet"], "unknown backbone"),
    (["--suites", "embed", "--embed-actors", "-1"], "--embed-actors must be 0 (automatic) or more"),
    (["--suites", "serve", "--serve-clients", "0"], "--serve-clients must be positive, got 0"),
])
def test_bad_choices_stop_with_one_line(argv, message, capsys):
    assert benchmark.cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_every_suite_has_a_summary_line():
    assert tuple(benchmark.SUITES) == SUITE_NAMES
    assert all(callable(suite.run) and callable(suite.summary) for suite in benchmark.SUITES.values())
    row = {"ratio_project_over_bare_faiss": 1.05, "ratio_sklearn_loop_over_project": 250.0}
    line = benchmark.SUITES["retrieval"].summary({"n_queries": 10, "dim_128": row, "dim_2048": row})
    assert line.count("project/bare faiss 1.05x") == 2 and "2048-d" in line
    latency = {"p50_ms": 21.5, "p99_ms": 60.0, "replica_p50_ms": 15.0}
    load = {"queries_per_s": 80.0, "p50_ms": 90.0, "mean_batch": 6.5}
    line = benchmark.SUITES["serve"].summary({"latency": latency, "throughput": load, "clients": 8, "goals_met": True})
    assert line.startswith("warm query p50 21.5 ms, p99 60.0 ms") and "8 clients 80.0 queries/s" in line
    assert line.endswith("goals met")
