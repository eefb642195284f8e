"""The Tune driver: every trial fits a real ``TorchTrainer``; ASHA stops weak trials; reruns resume.

Ray Train V2 trainers cannot be handed to a ``Tuner`` (``Tuner(trainer)`` raises "Improper 'run'"): a
trial is a function that builds the trainer of its config (``onray.trainer.build_trainer``, the one
``jobs.train`` uses) and fits it with ``TuneReportCallback``, which forwards each epoch's report to Tune.
The trial's own process holds one CPU; its Train workers and Ray Data ask for theirs separately, so the
number of trials at once is bounded by what the cluster has room for (``lib.planning.plan_trials``), not by Tune.
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
from lib.training import HPARAM_KEYS, METRIC, METRIC_MODE, TrainConfig
from onray.trainer import Subsets, build_trainer
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
              trainers_per_node: int, storage: str, subsets: Subsets) -> None:
    """One Tune trial: the base training config with this trial's values, fitted by Ray Train."""
    cfg = from_dict(TrainConfig, {**base, **config}, source="trial config")  # a bad value fails at once
    trial_id = ray.tune.get_context().get_trial_id()
    # Named by trial id: a retried or resumed trial continues from its own last checkpoint.
    trainer = build_trainer(cfg, use_gpu, num_classes, trainers_per_node, name=trial_id, storage=storage,
                            subsets=subsets, callbacks=[TuneReportCallback()])
    trainer.fit()


def fit(base: TrainConfig, space: Space, storage: str, *, search: str, num_samples: int, grace_period: int,
        reduction_factor: float, max_concurrent: int, max_failures: int, use_gpu: bool, num_classes: int,
        trainers_per_node: int, subsets: Subsets) -> ray.tune.ResultGrid:
    """Run (or resume, when ``storage`` holds an interrupted experiment) the search; returns Tune's results.

    ``subsets``: :func:`onray.trainer.training_subsets` of ``base`` (a trial changes hyper-parameters only, never
    the subset sizes or the seed), handed to every trial.

    ``storage`` is a local path or a URI (``s3://...``): Tune's experiment and the trials' checkpoints go there.
    """
    storage = storage.rstrip("/")
    trainable = ray.tune.with_parameters(run_trial, base=to_dict(base), use_gpu=use_gpu, num_classes=num_classes,
                                         trainers_per_node=trainers_per_node, storage=f"{storage}/{TRAIN_RUNS}",
                                         subsets=subsets)
    experiment = f"{storage}/{EXPERIMENT}"
    if ray.tune.Tuner.can_restore(experiment):
        log(f"resuming the interrupted tune in {experiment}")
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    # Epochs, not Tune's iteration counter: a retried trial resumes at its checkpoint's epoch.
    scheduler = ray.tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=base.epochs,
                                                  grace_period=min(grace_period, base.epochs),
                                                  reduction_factor=reduction_factor)
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=base.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune applies max_concurrent_trials only to a searcher it builds itself: this one carries it.
        searcher = BasicVariantGenerator(random_state=base.seed, max_concurrent=max_concurrent)
    tuner = ray.tune.Tuner(
        trainable,
        param_space=to_tune(space),
        tune_config=ray.tune.TuneConfig(metric=METRIC, mode=METRIC_MODE, num_samples=num_samples,
                                        scheduler=scheduler, search_alg=searcher,
                                        max_concurrent_trials=None if search == "random" else max_concurrent),
        # Tune's own status table goes to stdout: a routed console shows the bar instead (--verbose both).
        run_config=ray.tune.RunConfig(name=EXPERIMENT, storage_path=storage,
                                      verbose=0 if console.is_active() and not console.is_verbose() else 1,
                                      callbacks=[ReleaseStoppedTrainers(), TrialsBar(num_samples, base.epochs,
                                                                                     base.backbone)],
                                      failure_config=ray.tune.FailureConfig(max_failures=max_failures)),
    )
    return tuner.fit()


def finished(results: ray.tune.ResultGrid) -> bool:
    """True when every trial ended (completed, stopped or failed for good); False after an interrupt."""
    return len(results) > 0 and results.num_terminated + results.num_errors == len(results)


def trial_rows(results: ray.tune.ResultGrid, base: TrainConfig) -> list[dict[str, Any]]:
    """One plain row per trial: id, every hyper-parameter, epochs reported, best val mAP@5, status."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        history = [] if frame is None or METRIC not in frame else frame[["epoch", METRIC]].dropna().to_dict("records")
        scores = [row[METRIC] for row in history if not math.isnan(row[METRIC])]
        epochs = int(max((row["epoch"] for row in history), default=0))
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        values = from_dict(TrainConfig, {**to_dict(base), **{k: v for k, v in result.config.items()
                                                             if k in HPARAM_KEYS}}, source="trial config")
        if result.error is not None:
            status = "error"
        else:
            status = "completed" if epochs >= base.epochs else "stopped early"
        rows.append({"trial_id": trial_id, **{key: getattr(values, key) for key in HPARAM_KEYS}, "epochs": epochs,
                     "best": float(max(scores)) if scores else None, "status": status,
                     "error": None if result.error is None else str(result.error).strip().splitlines()[-1]})
    return sorted(rows, key=lambda row: row["trial_id"])
