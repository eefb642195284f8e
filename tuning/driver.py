"""The Tune driver: every trial fits a real ``TorchTrainer``; ASHA stops weak trials; reruns resume.

Ray Train V2 trainers cannot be handed to a ``Tuner`` (``Tuner(trainer)`` raises "Improper 'run'"): a
trial is a function that builds the trainer of its config (``onray.trainer.build_trainer``, the one
``jobs.train`` uses) and fits it with ``TuneReportCallback``, which forwards each epoch's report to Tune.
The trial's own process holds one CPU; its Train workers and Ray Data ask for theirs separately, so the
number of trials at once is bounded by what the cluster has room for (``lib.planning.plan_trials``), not by Tune.

Reruns resume from the project's JSON record of the trials (:mod:`tuning.record`), never from Tune's pickles.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from lib import console
from lib.config import from_dict, to_dict
from lib.console import Progress, log
from lib.io import write_json
from lib.training import HPARAM_KEYS, METRIC, METRIC_MODE, TrainConfig
from onray.trainer import Subsets, build_trainer, raise_disk_error
from tuning.record import FINISHED, last_score, trial_row
from tuning.spaces import Space, to_tune

# Per tune preset: trials, ASHA's grace period and reduction factor, and the training options every
# trial runs with (on top of the training preset of the same name). quick is sized for a 2-core CPU
# machine, about 15 minutes in all: the quick training subset (500 images per class), 4 epochs, ASHA
# halving at epoch 2. Measured: with 200 images per class for 3 epochs no ResNet50 trial beat its untrained
# network (val mAP@5 0.109), so trials were ranked by noise; from scratch the triplet loss needs about
# 2,000 images per class seen before val mAP@5 moves.
TUNE_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(num_samples=3, grace_period=1, reduction_factor=2, train={}),
    "quick": dict(num_samples=6, grace_period=2, reduction_factor=2,
                  train=dict(epochs=4, train_per_class=500, val_per_class=100, patience=0)),
    "full": dict(num_samples=24, grace_period=2, reduction_factor=3, train=dict(epochs=12, patience=0)),
}
EXPERIMENT = "trials"  # Tune's experiment folder inside the tune's storage (default RUN/tune/<backbone>/)
TRAIN_RUNS = "train"  # each trial's Ray Train run (checkpoints) goes to <storage>/train/<trial id>


class ReleaseStoppedTrainers(ray.tune.Callback):
    """Free the workers of trials that Tune stopped (ASHA) or lost, so the next trial can start.

    Tune stops a trial by ending its process, which takes the trial's Ray Train controller with it.
    The controller's placement group (its workers' CPUs and GPUs) belongs to the job, not to the
    controller, and outlives it. Train's own cleaner finds such groups through the dashboard's state
    API; where no dashboard runs (the test session's Ray, some clusters) it never does, and the next
    trial waits for workers forever. This callback removes the groups of this job whose creating
    actor is dead, reading the GCS table directly (every few seconds, from Tune's driver loop).
    """

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.last = every_s, 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            release_orphaned_placement_groups()


class TrialsBar(ray.tune.Callback):
    """One progress bar for the whole search, counting trial epochs: each reported epoch moves it by one, and
    a trial that ends early (ASHA, an error) counts its remaining epochs as done, so the bar ends full."""

    def __init__(self, trials: int, epochs: int, name: str):
        self.trials, self.epochs, self.name, self.done, self.best = trials, epochs, name, 0, None
        self.counted: dict[str, int] = {}
        self.bar: Progress | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment; a bar stays here
        return {**self.__dict__, "bar": None}

    @property
    def progress(self) -> Progress:
        if self.bar is None:
            self.bar = Progress(self.trials * self.epochs, f"tune {self.name}", unit="epoch", initial=self.done)
        return self.bar

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.counted[trial.trial_id] = self.counted.get(trial.trial_id, 0) + 1
        self.done += 1
        if result.get(METRIC) is not None and (self.best is None or result[METRIC] > self.best):
            self.best = result[METRIC]
        self.progress.update(self.done, postfix=f"best {METRIC} {self.best:.3f}" if self.best is not None else "")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += max(0, self.epochs - self.counted.get(trial.trial_id, 0))
        self.counted[trial.trial_id] = self.epochs
        self.progress.update(self.done)

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor died; returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    from onray.ray_internals import placement_groups

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    table = placement_groups()
    if table is None:  # a private table: if a Ray release changes it, Train's own cleaner remains
        return 0
    for group in table:
        # A driver's groups (Tune's own, one per trial) have no creating actor and count as "actor dead".
        created_by_actor = bool(group.creator_actor_id) and not ray.ActorID(group.creator_actor_id).is_nil()
        if (group.state != type(group).REMOVED and created_by_actor and group.creator_actor_dead
                and not group.is_detached and group.creator_job_id.hex() == job):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            removed += 1
    if removed:
        log(f"released {removed} placement group(s) of stopped trials")
    return removed


def run_trial(config: dict[str, Any], *, base: dict[str, Any], use_gpu: bool, num_classes: int,
              trainers_per_node: int, storage: str, subsets: Subsets, planned: list[dict[str, Any]] | None) -> None:
    """One Tune trial: the base training config with this trial's values, fitted by Ray Train.

    ``planned``: the random search's trials; its Tune config is then ``{"trial": index}``.
    """
    values = planned[config["trial"]] if planned is not None else config
    cfg = from_dict(TrainConfig, {**base, **values}, source="trial config")  # a bad value fails at once
    trial_id = ray.tune.get_context().get_trial_id()
    # Named by trial id: a retried trial continues from its own last checkpoint.
    trainer = build_trainer(cfg, use_gpu, num_classes, trainers_per_node, name=trial_id, storage=storage,
                            subsets=subsets, callbacks=[TuneReportCallback()])
    raise_disk_error(trainer.fit())  # a full disk ends the trial with its one line


class TrialRecorder(ray.tune.Callback):
    """Writes :mod:`tuning.record`'s ``trials.json`` as trials report and end, from Tune's driver loop.

    It also forgets each trial's pickled error (Tune's ``error.pkl``), so that the results Tune hands back
    read the trial's error as text: a file in RUN is never unpickled.
    """

    def __init__(self, path: Path, finished: list[dict[str, Any]], planned: list[dict[str, Any]] | None,
                 epochs: int):
        self.path, self.planned, self.epochs = path, planned, epochs
        self.entries: dict[str, dict[str, Any]] = {entry["trial_id"]: entry for entry in finished}

    def _entry(self, trial) -> dict[str, Any]:
        if trial.trial_id not in self.entries:
            index = trial.config["trial"] if self.planned is not None else None
            config = self.planned[index] if self.planned is not None else {
                key: value for key, value in trial.config.items() if key in HPARAM_KEYS}
            self.entries[trial.trial_id] = {"trial_id": trial.trial_id, "index": index, "config": config,
                                            "history": [], "status": "running", "error": None}
        return self.entries[trial.trial_id]

    def _write(self) -> None:
        write_json(self.path, {"trials": list(self.entries.values())})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        score = result.get(METRIC)
        score = float(score) if score is not None and math.isfinite(score) else None
        self._entry(trial)["history"].append([int(result.get("epoch", 0)), score])
        self._write()

    def on_trial_complete(self, iteration, trials, trial, **info):
        entry = self._entry(trial)
        entry["status"] = "completed" if max((e for e, _ in entry["history"]), default=0) >= self.epochs \
            else "stopped early"
        self._write()

    def on_trial_recover(self, iteration, trials, trial, **info):
        trial.run_metadata.pickled_error_filename = None

    def on_trial_error(self, iteration, trials, trial, **info):
        trial.run_metadata.pickled_error_filename = None
        entry = self._entry(trial)
        entry["status"], entry["error"] = "error", _error_line(trial)
        self._write()


def _error_line(trial) -> str:
    """The last line of the trial's error text (Tune's ``error.txt``: text, read as text)."""
    try:
        lines = Path(trial.error_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return lines[-1].strip() if lines else "the trial failed"
    except (OSError, TypeError):
        return "the trial failed"


def fit(base: TrainConfig, space: Space, storage: str, record: Path, finished: list[dict[str, Any]],
        planned: list[dict[str, Any]] | None, *, search: str, num_samples: int,
        grace_period: int, reduction_factor: float, max_concurrent: int, max_failures: int, use_gpu: bool,
        num_classes: int, trainers_per_node: int, subsets: Subsets) -> list[dict[str, Any]]:
    """Run the search, or the rest of it when ``record`` holds an earlier run's finished trials; returns
    the record's entries (:mod:`tuning.record`), every planned trial finished unless interrupted.

    ``finished``: :func:`tuning.record.read_record` of ``record``; ``planned``: the random search's trials
    (:func:`tuning.spaces.sample_trials` of ``space``, ``num_samples`` and the seed), ``None`` for Optuna.

    Tune's own state is never restored (its restore unpickles files in ``storage``): a trial the record holds
    as finished is kept; a random search runs its other planned trials, Optuna is told the finished trials'
    scores and draws the rest. An interrupted trial starts again from its first epoch, and ASHA compares only
    the trials of this run.

    ``subsets``: :func:`onray.trainer.training_subsets` of ``base`` (a trial changes hyper-parameters only, never
    the subset sizes or the seed), handed to every trial.

    ``storage`` is a local path or a URI (``s3://...``): Tune's experiment and the trials' checkpoints go there.
    """
    storage = storage.rstrip("/")
    total = len(planned) if planned is not None else num_samples
    todo = total - len(finished)
    if finished:
        log(f"resuming the interrupted tune from {record}: {len(finished)} of {total} trial(s) finished, "
            f"{todo} to run")
    if todo <= 0:
        return finished
    trainable = ray.tune.with_parameters(run_trial, base=to_dict(base), use_gpu=use_gpu, num_classes=num_classes,
                                         trainers_per_node=trainers_per_node, storage=f"{storage}/{TRAIN_RUNS}",
                                         subsets=subsets, planned=planned)
    # Epochs, not Tune's iteration counter: a retried trial resumes at its checkpoint's epoch.
    scheduler = ray.tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=base.epochs,
                                                  grace_period=min(grace_period, base.epochs),
                                                  reduction_factor=reduction_factor)
    if planned is None:
        from ray.tune.search.optuna import OptunaSearch

        told = [entry for entry in finished if last_score(entry) is not None]
        # Another seed on each resume, so TPE's random start does not repeat the finished trials' draws.
        searcher = OptunaSearch(seed=(base.seed + len(finished)) % 2**32,
                                points_to_evaluate=[e["config"] for e in told] or None,
                                evaluated_rewards=[last_score(e) for e in told] or None)
        param_space = to_tune(space)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune applies max_concurrent_trials only to a searcher it builds itself: this one carries it.
        searcher = BasicVariantGenerator(max_concurrent=max_concurrent)
        done = {entry["index"] for entry in finished}
        param_space = {"trial": ray.tune.grid_search([i for i in range(total) if i not in done])}
    recorder = TrialRecorder(record, finished, planned, base.epochs)
    tuner = ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(metric=METRIC, mode=METRIC_MODE, num_samples=1 if planned else todo,
                                        scheduler=scheduler, search_alg=searcher,
                                        max_concurrent_trials=None if planned else max_concurrent),
        # Tune's own status table goes to stdout: a routed console shows the bar instead (--verbose both).
        run_config=ray.tune.RunConfig(name=EXPERIMENT, storage_path=storage,
                                      verbose=0 if console.is_active() and not console.is_verbose() else 1,
                                      callbacks=[ReleaseStoppedTrainers(), TrialsBar(todo, base.epochs, base.backbone),
                                                 recorder],
                                      failure_config=ray.tune.FailureConfig(max_failures=max_failures)),
    )
    tuner.fit()
    return list(recorder.entries.values())


def finished(entries: list[dict[str, Any]], total: int) -> bool:
    """True when ``total`` trials ended (completed, stopped or failed for good); False after an interrupt."""
    return sum(entry["status"] in FINISHED for entry in entries) >= total


def trial_rows(entries: list[dict[str, Any]], base: TrainConfig) -> list[dict[str, Any]]:
    """One plain row per trial: id, every hyper-parameter, epochs reported, best val mAP@5, status."""
    rows = []
    for entry in entries:
        values = from_dict(TrainConfig, {**to_dict(base), **entry["config"]}, source="trial config")
        rows.append({**trial_row(entry), **{key: getattr(values, key) for key in HPARAM_KEYS}})
    return sorted(rows, key=lambda row: row["trial_id"])
