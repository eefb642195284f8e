"""Search spaces as data, the trial table and best.json: checked without starting Ray."""

import json

import pytest

from jobs import tune
from lib.errors import UserError
from lib.training import HPARAM_KEYS, TrainConfig, load_hparams
from tuning import report, spaces


def test_every_preset_space_searches_margin_and_lr_over_sane_ranges():
    for preset in ("smoke", "quick", "full"):
        space = spaces.preset_space(preset)
        assert spaces.searched_keys(space)[:2] == ["margin", "lr"]
        assert space["margin"] == spaces.Dimension("uniform", (0.05, 0.5))
        assert space["lr"].kind == "loguniform" and 0 < space["lr"].values[0] < space["lr"].values[1] <= 1e-2
    assert set(spaces.preset_space("full")) == set(HPARAM_KEYS)


def test_a_yaml_space_is_checked_and_typed(tmp_path):
    path = tmp_path / "space.yaml"
    # "1e-4" without a dot is a string to YAML 1.1: it must still read as a float
    path.write_text("margin: {uniform: [0.1, 0.3]}\nlr: {loguniform: [1e-4, 1.0e-2]}\n"
                    "miner: {choice: [all, hard]}\nembedding-dim: {grid: [32, 64]}\nweight_decay: 0\n")
    space = spaces.load_space(path)
    assert space["lr"] == spaces.Dimension("loguniform", (1e-4, 1e-2))
    assert space["embedding_dim"] == spaces.Dimension("grid", (32, 64))
    assert spaces.searched_keys(space) == ["margin", "lr", "miner", "embedding_dim"]
    assert spaces.fixed_values(space) == {"weight_decay": 0.0}


@pytest.mark.parametrize(("raw", "message"), [
    ({"epochs": {"choice": [1, 2]}}, "'epochs' in test is a training option that cannot be tuned"),
    ({"margn": {"uniform": [0.1, 0.2]}}, "'margn' in test is not a training option"),
    ({"margin": {"normal": [0.1, 0.2]}}, "expected one of uniform, loguniform, choice, grid"),
    ({"margin": {"uniform": [0.3, 0.1]}}, "low < high"),
    ({"lr": {"loguniform": [0, 0.1]}}, "loguniform needs low > 0"),
    ({"miner": {"uniform": ["all", "hard"]}}, "uniform needs a float option"),
    ({"miner": {"choice": ["all", "sometimes"]}}, "'sometimes' is not one of semihard, hard, all, easy"),
    ({"embedding_dim": {"uniform": [16.0, 64.0]}}, "uniform needs a float option; use choice or grid"),
    ({"embedding_dim": {"choice": [32, 0]}}, "values must be positive"),
    ({"lr": {"choice": []}}, "takes a non-empty list"),
    ([], "must be a non-empty mapping"),
])
def test_bad_spaces_name_the_key_and_the_source(raw, message):
    with pytest.raises(UserError) as caught:
        spaces.check_space(raw, "test")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_space_key_stops_the_job_with_one_line_and_exit_2_before_any_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("onray.runtime.init_ray",
                        lambda *args, **kwargs: pytest.fail("started Ray before checking the space"))
    path = tmp_path / "space.yaml"
    path.write_text("margin: {uniform: [0.1, 0.3]}\nbatch_size: {choice: [16, 32]}\n")
    code = tune.cli(["--data-dir", str(tmp_path / "no-data"), "--run-dir", str(tmp_path / "run"),
                     "--space", str(path), "--preset", "smoke"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("jobs.tune: error: search space key 'batch_size'") and str(path) in lines[0]
    assert not (tmp_path / "run").exists()


def test_bad_flags_fail_with_one_line(tmp_path, capsys):
    base = ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")]
    assert tune.cli([*base, "--backbone", "alexnet"]) == 2
    assert tune.cli([*base, "--reduction-factor", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "unknown backbone(s) alexnet" in err[0] and "--reduction-factor must be greater than 1" in err[1]


ROWS = [
    {"trial_id": "a_00000", "margin": 0.2, "lr": 2e-3, "miner": "all", "embedding_dim": 32, "weight_decay": 1e-4,
     "loss": "triplet", "epochs": 3, "best": 0.61, "status": "completed"},
    {"trial_id": "a_00001", "margin": 0.4, "lr": 1e-5, "miner": "all", "embedding_dim": 32, "weight_decay": 1e-4,
     "loss": "triplet", "epochs": 1, "best": 0.30, "status": "stopped early"},
    {"trial_id": "a_00002", "margin": 0.1, "lr": 5e-3, "miner": "all", "embedding_dim": 32, "weight_decay": 1e-4,
     "loss": "supcon", "epochs": 0, "best": None, "status": "error"},
]


def test_trial_table_marks_the_best_trial_and_best_json_is_what_train_reads(tmp_path):
    table = report.trials_markdown(ROWS, ["margin", "lr"], "Tune").splitlines()
    assert table[2] == "| trial | margin | lr | epochs | best val_map@5 | status |"
    assert table[4] == "| a_00000 (best) | 0.2 | 0.002 | 3 | 0.6100 | completed |"
    assert table[6] == "| a_00002 | 0.1 | 0.005 | 0 |  | error |"

    document = report.write_report(tmp_path, ROWS, ["margin", "lr"], "resnet50", "smoke")
    assert json.loads((tmp_path / "best.json").read_text()) == document == {
        "margin": 0.2, "lr": 2e-3, "miner": "all", "embedding_dim": 32, "weight_decay": 1e-4, "loss": "triplet",
        "val_map@5": 0.61, "backbone": "resnet50", "preset": "smoke"}
    assert load_hparams(tmp_path / "best.json") == {k: document[k] for k in HPARAM_KEYS}
    resolved = TrainConfig(data_dir="d", run_dir="r", preset="quick", hparams=str(tmp_path / "best.json")).resolve()
    assert (resolved.margin, resolved.lr, resolved.embedding_dim) == (0.2, 2e-3, 32)
    assert (tmp_path / "trials.md").read_text().startswith("# Tune resnet50 (smoke): 3 trials, best val_map@5 0.6100")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "trials.md", "tune.png"]


def test_tune_figure_plots_every_scored_trial_against_margin_and_log_lr():
    figure = report.tune_figure(ROWS, "Tune")
    margin_axes, lr_axes = figure.axes
    assert margin_axes.get_xscale() == "linear" and lr_axes.get_xscale() == "log"
    plotted = sorted(tuple(p) for c in lr_axes.collections for p in c.get_offsets())
    assert plotted == sorted([(2e-3, 0.61), (2e-3, 0.61), (1e-5, 0.30)])  # two trials + the best ring
