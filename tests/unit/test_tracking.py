"""lib.tracking without a server: what the files become in MLflow (keys, params, per-epoch steps), and that nothing
imports mlflow unless a tracking URI is given. The server test is tests/integration/test_tracking.py."""

import ast
import math
import sys
from pathlib import Path

from lib.tracking import (
    Tracker,
    _reason,
    epoch_metrics,
    experiment_name,
    files_digest,
    flat_metrics,
    flat_params,
    metric_key,
    tracking_uri,
)

REPO = Path(__file__).resolve().parents[2]


def test_metric_names_mlflow_accepts():
    assert metric_key("val_map@5") == "val_map_at_5"
    assert metric_key("map@r") == "map_at_r"
    assert metric_key("p@1 (L)") == "p_at_1 _L_"
    assert metric_key("gpu_peak_memory_gb") == "gpu_peak_memory_gb"


def test_a_nested_config_becomes_dotted_params_and_lists_are_joined():
    config = {"backbones": ["resnet50", "vgg16"], "lr": 0.002, "miner": None,
              "loss_params": {"ms_alpha": 2.0, "inner": {"x": True}}, "weights": "w" * 7000}
    params = flat_params(config)
    assert params == {"backbones": "resnet50,vgg16", "lr": "0.002", "miner": "None", "loss_params.ms_alpha": "2.0",
                      "loss_params.inner.x": "True", "weights": "w" * 6000}  # MLflow's longest param value


def test_only_finite_numbers_become_metrics():
    document = {"resnet50": {"L": {"map@5": 0.25, "p@5": 1}, "note": "text", "flag": True, "nan": math.nan},
                "stacked": {"G": {"map@5": 0.5}}}
    assert flat_metrics(document) == {"resnet50.L.map_at_5": 0.25, "resnet50.L.p_at_5": 1.0,
                                      "stacked.G.map_at_5": 0.5}


def test_every_epoch_row_is_logged_at_its_epoch_as_step():
    history = [{"epoch": 0, "val_map@5": 0.1, "val_loss": 0.3},
               {"epoch": 1, "train_loss": 0.5, "val_map@5": 0.2, "resumed_from": 0, "collapsed": False}]
    assert sorted(epoch_metrics(history)) == [("train_loss", 0.5, 1), ("val_loss", 0.3, 0),
                                              ("val_map_at_5", 0.1, 0), ("val_map_at_5", 0.2, 1)]


def test_the_one_line_names_the_os_error_of_a_refused_connection():
    message = ("API request to http://127.0.0.1:1/api/2.0/mlflow/experiments/search failed with exception "
               "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /api/2.0/mlflow/"
               "experiments/search (Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=1): "
               "Failed to establish a new connection: [Errno 111] Connection refused\"))")
    assert _reason(RuntimeError(message)) == "[Errno 111] Connection refused"
    assert _reason(ValueError("bad\nsecond line")) == "bad"
    assert len(_reason(ValueError("x" * 500))) == 160


def test_the_uri_and_the_experiment_come_from_the_flag_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert tracking_uri("") == ""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri("") == "http://tracking:5000" and tracking_uri("http://mine:1") == "http://mine:1"
    assert experiment_name(tmp_path / "r1") == "r1"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    assert experiment_name(tmp_path / "r1") == "team"


def test_a_result_digest_changes_with_the_file_and_the_run_folder(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text('{"best": 0.1}')
    first = files_digest(tmp_path, [summary])
    assert files_digest(tmp_path / "other", [summary]) != first
    summary.write_text('{"best": 0.2}')
    assert files_digest(tmp_path, [summary]) != first


def test_without_a_tracking_uri_mlflow_is_never_imported(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    already = "mlflow" in sys.modules  # another test of this session may have imported it
    assert Tracker.connect("", tmp_path / "run") is None
    assert already or "mlflow" not in sys.modules


def test_only_lib_tracking_imports_mlflow_and_only_inside_functions():
    """At module level nothing imports mlflow, so a job without --mlflow never loads it (or needs it installed)."""
    offenders, found = [], 0
    for path in REPO.glob("*/**/*.py"):
        if path.parts[len(REPO.parts)] not in ("lib", "onray", "tuning", "jobs", "benchmarks", "tools"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(inner) for function in functions for inner in ast.walk(function)}
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "mlflow" for name in names):
                where, found = f"{path.relative_to(REPO)}:{node.lineno}", found + 1
                if path.relative_to(REPO) != Path("lib/tracking.py") or id(node) not in inside:
                    offenders.append(where)
    assert offenders == [] and found >= 3  # the client, the entities and the exceptions, in lib.tracking


def test_train_tune_evaluate_and_the_pipeline_take_one_and_the_same_mlflow_flag():
    from lib.config import parse_config
    from lib.evaluation import EvaluateConfig
    from lib.pipeline import PipelineConfig
    from lib.training import TrainConfig
    from tuning.run import TuneJobConfig

    uri = "http://127.0.0.1:5000"
    pipeline = parse_config(PipelineConfig, ["--source", "imagefolder:/i", "--run-dir", "/r", "--mlflow", uri])
    assert pipeline.train_config().mlflow == uri  # each backbone's training is tracked to the pipeline's server
    tune = parse_config(TuneJobConfig, ["--data-dir", "/d", "--run-dir", "/r", "--mlflow", uri])
    assert tune.mlflow == uri and tune.train_config().mlflow == uri
    evaluate = parse_config(EvaluateConfig, ["--data-dir", "/d", "--run-dir", "/r", "--mlflow", uri])
    assert evaluate.mlflow == uri
    assert parse_config(TrainConfig, ["--data-dir", "/d", "--run-dir", "/r"]).mlflow == ""  # off by default
