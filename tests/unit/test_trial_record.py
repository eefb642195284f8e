"""The trial record a tune resumes from (tuning.record) is checked data, and the random search's trials are a
pure function of the space, the number of samples and the seed (tuning.spaces.sample_trials)."""

import json

import pytest

from lib.errors import UserError
from tuning.record import read_record
from tuning.spaces import check_space, sample_trials

SPACE = check_space({"margin": {"uniform": [0.1, 0.4]}, "lr": {"loguniform": [1e-3, 5e-3]},
                     "embedding_dim": {"grid": [32, 1]}, "miner": {"choice": ["all", "hard"]}}, "test")


def test_random_trials_cover_the_grid_in_each_round_within_the_ranges_and_repeat_for_a_seed():
    trials = sample_trials(SPACE, num_samples=3, seed=7)
    assert [trial["embedding_dim"] for trial in trials] == [32, 1] * 3
    assert all(0.1 <= t["margin"] <= 0.4 and 1e-3 <= t["lr"] <= 5e-3 and t["miner"] in ("all", "hard") for t in trials)
    assert trials == sample_trials(SPACE, num_samples=3, seed=7) != sample_trials(SPACE, num_samples=3, seed=8)
    assert json.loads(json.dumps(trials)) == trials  # the record's JSON round trip finds them again


def entry(position, planned, status="completed", **changes):
    return {"trial_id": f"t{position}", "index": position, "config": planned[position], "history": [[1, 0.5], [2, 0.6]],
            "status": status, "error": None, **changes}


def test_the_record_gives_back_its_finished_trials(tmp_path):
    planned = sample_trials(SPACE, 2, 0)
    path = tmp_path / "trials.json"
    assert read_record(path, planned) == []  # no record: a fresh tune
    path.write_text(json.dumps({"trials": [entry(0, planned), entry(1, planned, "running")]}))
    assert [e["trial_id"] for e in read_record(path, planned)] == ["t0"]


@pytest.mark.parametrize("make", [
    lambda p: "\x80\x04cos\nsystem\n",  # a pickle
    lambda p: "[]",
    lambda p: json.dumps({"trials": [entry(0, p)], "extra": 1}),
    lambda p: json.dumps({"trials": [entry(0, p, index=5)]}),  # not a trial of this search
    lambda p: json.dumps({"trials": [entry(0, p, config={**p[0], "margin": 9.0})]}),
    lambda p: json.dumps({"trials": [entry(0, p, config={**p[0], "data_dir": "/etc"})]}),
    lambda p: json.dumps({"trials": [entry(0, p, history=[[1, "NaN"]])]}),
    lambda p: json.dumps({"trials": [entry(0, p, status="done")]}),
    lambda p: json.dumps({"trials": [entry(0, p), entry(0, p, trial_id="t9")]}),  # finished twice
])
def test_anything_but_a_record_this_driver_writes_is_one_line_naming_the_file(tmp_path, make):
    planned = sample_trials(SPACE, 2, 0)
    path = tmp_path / "trials.json"
    path.write_text(make(planned))
    with pytest.raises(UserError, match=r"trials.json is not a trial record this project wrote") as err:
        read_record(path, planned)
    assert "\n" not in str(err.value)
