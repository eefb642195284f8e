"""The project's own record of a tune's trials, ``RUN/tune/<backbone>/trials.json``: plain JSON, never code.

A rerun into the same RUN resumes from this record, not from Tune's experiment folder: Tune's restore
unpickles ``tuner.pkl``, the searcher's state and every trial's state, and a RUN on shared storage may be
writable by others. The driver writes the record as trials report (atomically, after every epoch and at
every trial's end); a resume keeps its finished trials and runs the rest of the search again.

One entry per trial::

    {"trial_id": "a1b2c_00001", "index": 1, "config": {"margin": 0.21, "lr": 0.003},
     "history": [[1, 0.412], [2, 0.455]], "status": "completed", "error": null}

``index`` is the trial's place in :func:`tuning.spaces.sample_trials` (random search) or ``null`` (Optuna);
``history`` holds ``[epoch, val mAP@5 or null]`` per report; ``status`` is ``running``, ``completed``,
``stopped early`` or ``error``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lib.errors import UserError
from lib.training import HPARAM_KEYS

RECORD_FILE = "trials.json"
FINISHED = ("completed", "stopped early", "error")
STATUSES = ("running", *FINISHED)


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a trial record this project wrote ({why}); delete it to tune "
                     f"again from the start, or use another --run-dir")


def _check_entry(entry: Any, path: Path, planned: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One entry, checked field by field; returns it as the driver uses it."""
    if not isinstance(entry, dict) or set(entry) != {"trial_id", "index", "config", "history", "status", "error"}:
        raise _refuse(path, "an entry's keys differ")
    trial_id, index, config, history, status, error = (entry[key] for key in (
        "trial_id", "index", "config", "history", "status", "error"))
    if not isinstance(trial_id, str) or not trial_id or status not in STATUSES:
        raise _refuse(path, f"bad trial id or status in {trial_id!r}")
    if not isinstance(config, dict) or not set(config) <= set(HPARAM_KEYS) or not all(
            isinstance(value, (str, int, float)) and not isinstance(value, bool) for value in config.values()):
        raise _refuse(path, f"trial {trial_id}'s config is not a set of tunable values")
    if planned is None:
        if index is not None:
            raise _refuse(path, f"trial {trial_id} has an index, but the search is not random")
    elif type(index) is not int or not 0 <= index < len(planned) or planned[index] != config:
        raise _refuse(path, f"trial {trial_id} is not trial {index!r} of this search")
    if not isinstance(history, list) or not all(
            isinstance(row, list) and len(row) == 2 and type(row[0]) is int and row[0] >= 0
            and (row[1] is None or (isinstance(row[1], float) and math.isfinite(row[1]))) for row in history):
        raise _refuse(path, f"trial {trial_id}'s history is not [[epoch, score], ...]")
    if not (error is None or isinstance(error, str)):
        raise _refuse(path, f"trial {trial_id}'s error is not text")
    return entry


def read_record(path: Path, planned: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The finished trials of an earlier run of this tune (``[]`` when there is no record).

    ``planned``: the random search's trials (:func:`tuning.spaces.sample_trials`), or ``None`` for Optuna.
    Anything but a record this driver writes is :class:`UserError`, one line naming the file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        raise _refuse(path, f"unreadable: {err}") from None
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise _refuse(path, f"not JSON: {err}") from None
    if not isinstance(raw, dict) or set(raw) != {"trials"} or not isinstance(raw["trials"], list):
        raise _refuse(path, 'expected {"trials": [...]}')
    entries = [_check_entry(entry, path, planned) for entry in raw["trials"]]
    if len({entry["trial_id"] for entry in entries}) != len(entries):
        raise _refuse(path, "a trial id repeats")
    finished = [entry for entry in entries if entry["status"] in FINISHED]
    if planned is not None and len({entry["index"] for entry in finished}) != len(finished):
        raise _refuse(path, "a trial index is finished twice")
    return finished


def last_score(entry: dict[str, Any]) -> float | None:
    """The trial's last reported score (what a searcher is told about a trial that ended)."""
    scores = [score for _, score in entry["history"] if score is not None]
    return scores[-1] if scores else None


def trial_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The report's row of one entry: id, epochs reported, best score, status, error (values added by the caller)."""
    scores = [score for _, score in entry["history"] if score is not None]
    return {"trial_id": entry["trial_id"], "epochs": max((epoch for epoch, _ in entry["history"]), default=0),
            "best": max(scores) if scores else None, "status": entry["status"], "error": entry["error"]}
