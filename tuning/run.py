"""One backbone's tune, end to end: the job's config, its checks, the Tune driver and the report.

Writes ``RUN/tune/<backbone>/``: Tune's own results, the trial record ``trials.json`` (:mod:`tuning.record`),
``trials.md``, ``tune.png`` and, last,
``best.json``, which ``jobs.train --hparams`` accepts. Rerunning into the same RUN resumes an
interrupted tune from the trial record (never from Tune's pickled state) and leaves a finished one alone. A bad search space stops the job before Ray,
Train and Tune are imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Literal

from lib.config import borrowed, check_ranges, fields_from, option, to_dict
from lib.console import log
from lib.data.reader import PreparedData
from lib.errors import UserError, WorkFailed
from lib.io import ensure_writable_dir, write_json
from lib.paths import RunPaths, absolute
from lib.pipeline import PipelineConfig
from lib.tracking import Tracker
from lib.training import METRIC, TrainConfig
from tuning.record import RECORD_FILE, read_record
from tuning.spaces import fixed_values, load_space, preset_space, sample_trials, searched_keys

# jobs.train's settings a tune passes to every trial, as jobs.train declares them (None: the tune preset's
# value, else the training preset's). Adding a training flag to jobs.tune = adding its name here.
# A searched key (the space's margin, lr, loss, ...) wins over the value given here.
TRAIN_SETTINGS = ("data_dir", "preset", "weights", "num_workers", "use_gpu", "precision", "augment_on", "cache_budget",
                  "image_size", "batch_size", "epochs", "loss", "loss_params", "train_per_class", "val_per_class",
                  "mlflow")
# Of those, the ones that size the trials: the pipeline's tune stage leaves them to the tune preset.
TRIAL_SIZES = ("epochs", "train_per_class", "val_per_class")


@dataclasses.dataclass(frozen=True)
@fields_from(TrainConfig, TRAIN_SETTINGS, heading="every trial's training (jobs.train's flags)")
class TuneJobConfig:
    """Search training hyper-parameters with Ray Tune (ASHA early stopping, random or Optuna search)."""

    run_dir: str = option(help="run folder; results go to RUN/tune/<backbone>/")
    backbone: str = option("resnet50", help="the backbone to tune")
    num_samples: int | None = option(None, help="trials to run (default: by preset)")
    search: Literal["random", "optuna"] = option("random", help="random sampling or Optuna's TPE")
    space: str = option("", help="YAML search space {key: {uniform|loguniform|choice|grid: [...]}} "
                                 "(default: the preset's)")
    max_concurrent: int | None = option(None, help="trials at once (default: what the cluster fits)")
    grace_period: int | None = option(None, help="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float | None = option(None, help="ASHA: keep the best 1/N at each rung")
    # run_dir above and these have jobs.train's names but a tune's meanings, so they are declared here
    storage: str = option("", help="Tune's and the trials' Ray Train state: a path or s3://... "
                                   "(default: RUN/tune/<backbone>)")
    max_failures: int = option(2, help="retries of a failed trial (it resumes from its last checkpoint)")
    seed: int = option(0, help="seed of the search and of every trial's training")

    def __post_init__(self) -> None:
        # the training settings are checked by TrainConfig itself (train_config below), bounds included
        check_ranges(self, positive=("num_samples", "max_concurrent", "grace_period"),
                     non_negative=("max_failures", "seed"), at_most={"reduction_factor": 1000})
        if self.reduction_factor is not None and self.reduction_factor <= 1:
            raise UserError(f"--reduction-factor must be greater than 1, got {self.reduction_factor}")
        self.train_config()  # jobs.train's checks of the backbone and the training settings, now

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The training config every trial starts from (before the preset and the space): this tune's
        training settings, those left at None dropped so that ``overrides`` (the tune preset's) fill them."""
        given = {key: value for key, value in borrowed(self, TrainConfig).items() if value is not None}
        return TrainConfig(run_dir=self.run_dir, backbones=(self.backbone,), seed=self.seed,
                           **{**overrides, **given})


class TuneFailed(WorkFailed):
    """No trial reported a validation score."""


def tune_backbone(cfg: TuneJobConfig) -> Path:
    """Tune ``cfg.backbone`` (or resume it, or find it done); returns its ``best.json``."""
    from onray.runtime import check_cluster_paths

    check_cluster_paths(data_dir=cfg.data_dir, run_dir=cfg.run_dir, storage=cfg.storage)
    cfg = dataclasses.replace(cfg, run_dir=str(absolute(cfg.run_dir)), data_dir=str(absolute(cfg.data_dir)))
    space = load_space(cfg.space) if cfg.space else preset_space(cfg.preset)
    if cfg.search == "optuna":
        if any(dim.kind == "grid" for dim in space.values()):
            raise UserError("--search optuna cannot run grid dimensions; use choice, or --search random")
        if importlib.util.find_spec("optuna") is None:
            raise UserError("--search optuna needs the optuna package: pip install optuna")
    # A bad space stops the job above, before Ray, Train and Tune are imported (seconds).
    from onray.plan import ensure_resources
    from onray.runtime import check_shared_storage, init_ray, on_cluster
    from onray.trainer import check_weights, plan, training_subsets
    from tuning import driver, report

    preset = driver.TUNE_PRESETS[cfg.preset]
    # A space's fixed values win over the flags. Ray Train restarts no workers itself: Tune's retry of the
    # trial resumes it from its checkpoint.
    base = dataclasses.replace(cfg.train_config(**preset["train"]), max_failures=0, **fixed_values(space)).resolve()
    data = PreparedData.open(cfg.data_dir)
    out = ensure_writable_dir(RunPaths.of(cfg.run_dir).tune(cfg.backbone))
    settings = {"search": cfg.search, "num_samples": cfg.num_samples or preset["num_samples"],
                "grace_period": cfg.grace_period or preset["grace_period"],
                "reduction_factor": cfg.reduction_factor or preset["reduction_factor"],
                "space": {key: {dim.kind: list(dim.values)} for key, dim in space.items()}}
    identity = {**settings, "train": {k: v for k, v in to_dict(base).items() if k not in ("max_failures", "mlflow")}}
    _check_same_tune(out, identity)
    trials = settings["num_samples"] * math.prod(len(d.values) for d in space.values() if d.kind == "grid")
    planned = sample_trials(space, settings["num_samples"], base.seed) if cfg.search == "random" else None
    finished = read_record(out / RECORD_FILE, planned)  # a foreign record stops the job here, before Ray
    tracker = Tracker.connect(cfg.mlflow, cfg.run_dir)  # None without --mlflow; a dead server is one line here
    if (out / "best.json").is_file():
        log(f"{cfg.backbone}: already tuned with these settings; best hyper-parameters in {out / 'best.json'}")
        if tracker:
            tracker.log_tune(cfg.backbone)  # one missed while the server was down is logged now
        return out / "best.json"
    check_weights(base)
    init_ray()
    shape = plan(base)
    base = dataclasses.replace(base, num_workers=shape.num_workers)
    trials_plan = plan_trials_of(base, shape.use_gpu)
    fits = trials_plan.concurrent
    if cfg.max_concurrent and cfg.max_concurrent > fits:
        log(f"warning: --max-concurrent {cfg.max_concurrent} is more than the {fits} trial(s) this cluster "
            f"fits; Ray Data may wait for CPUs that trial drivers hold")
    concurrent = cfg.max_concurrent or fits
    if shape.use_gpu:  # the first wave's nodes, in the trials' shapes, before any trial starts
        wave = trials_plan.placements[:concurrent]
        ensure_resources(dataclasses.replace(trials_plan, placements=wave).bundles(), len(wave) * base.num_workers)
    # after the GPU nodes are up: the nodes whose workers write checkpoints are checked too
    check_shared_storage(out, data.root, cfg.storage)
    subsets = training_subsets(base, data)  # written once here, handed to every trial
    write_json(out / "tune_config.json", identity)
    log(f"tuning {cfg.backbone}: {trials} trial(s), {cfg.search} search, up to {concurrent} at "
        f"once on {base.num_workers} {'GPU' if shape.use_gpu else 'CPU'} worker(s) each, {base.epochs} epoch(s), "
        f"ASHA grace {settings['grace_period']} / factor {settings['reduction_factor']}; "
        f"space {', '.join(f'{k} {next(iter(v))}' for k, v in settings['space'].items())}")
    local = not shape.use_gpu and not on_cluster()
    storage = f"{cfg.storage.rstrip('/')}/tune/{cfg.backbone}" if cfg.storage else str(out)
    entries = driver.fit(base, space, storage, out / RECORD_FILE, finished, planned, search=cfg.search,
                         num_samples=settings["num_samples"],
                         grace_period=settings["grace_period"], reduction_factor=settings["reduction_factor"],
                         max_concurrent=concurrent, max_failures=cfg.max_failures, use_gpu=shape.use_gpu,
                         num_classes=len(data.classes), trainers_per_node=concurrent if local else 1,
                         subsets=subsets)
    if not driver.finished(entries, trials):
        raise KeyboardInterrupt  # the record holds the finished trials; a rerun into the same RUN resumes it
    rows = driver.trial_rows(entries, base)
    if report.best_row(rows) is None:
        why = next((row["error"] for row in rows if row["error"]), "no trial reported a score")
        raise TuneFailed(f"every trial failed ({why}); details under {storage}/{driver.EXPERIMENT}")
    best = report.write_report(out, rows, searched_keys(space), cfg.backbone, cfg.preset)
    print((out / "trials.md").read_text(), end="")
    log(f"{cfg.backbone}: best {METRIC} {best[METRIC]:.4f} with "
        f"{', '.join(f'{k} {best[k]:.4g}' if isinstance(best[k], float) else f'{k} {best[k]}' for k in searched_keys(space))}"
        f" -> {out / 'best.json'} (jobs.train --hparams)")
    if tracker:
        tracker.log_tune(cfg.backbone)
    return out / "best.json"


def plan_trials_of(base: TrainConfig, use_gpu: bool):
    """The running cluster's :class:`lib.planning.TrialPlan` for trials of ``base`` (its workers each)."""
    from lib.planning import plan_trials
    from onray.plan import cluster_shape

    return plan_trials(base.num_workers or 1, use_gpu, cluster_shape(base.use_gpu, base.num_workers or 1))


def dry_run(cfg: TuneJobConfig, unprepared_ok: bool = False):
    """``jobs.tune --dry-run``: the :class:`lib.planning.JobPlan` of the trials (how many at once, each one's
    workers, GPU share and nodes, what the autoscaler would be asked for); nothing trained, written or asked for.
    ``unprepared_ok`` (a pipeline's dry run): DATA may not be prepared yet, and the steps are then left out."""
    from lib.batching import planned_steps
    from lib.planning import training_job_plan
    from onray.runtime import check_cluster_paths, init_ray
    from onray.trainer import plan_of, train_rows

    check_cluster_paths(data_dir=cfg.data_dir, run_dir=cfg.run_dir, storage=cfg.storage)
    cfg = dataclasses.replace(cfg, run_dir=str(absolute(cfg.run_dir)), data_dir=str(absolute(cfg.data_dir)))
    space = load_space(cfg.space) if cfg.space else preset_space(cfg.preset)
    from tuning import driver

    preset = driver.TUNE_PRESETS[cfg.preset]
    base = dataclasses.replace(cfg.train_config(**preset["train"]), max_failures=0, **fixed_values(space)).resolve()
    data = PreparedData.find(cfg.data_dir) if unprepared_ok else PreparedData.open(cfg.data_dir)
    init_ray()
    shape, cluster = plan_of(base)
    base = dataclasses.replace(base, num_workers=shape.num_workers)
    trials = plan_trials_of(base, shape.use_gpu)
    samples = cfg.num_samples or preset["num_samples"]
    concurrent = min(cfg.max_concurrent or trials.concurrent, trials.concurrent, samples)
    rows = train_rows(base, data) if data else None
    steps = max(1, planned_steps(rows // base.num_workers, len(data.classes), base.batch_size,
                                 base.samples_per_class)) if data else None
    names = [f"trial {i + 1}" for i in range(concurrent)]
    wave = dataclasses.replace(trials, concurrent=concurrent, placements=trials.placements[:concurrent])
    return training_job_plan("jobs.tune", names, wave, cluster, cluster.gpus, [base.epochs] * concurrent, [base.batch_size] * concurrent, rows,
                             [steps] * concurrent, unit="trials",
                             notes=(f"{samples} trial(s) of {cfg.backbone} in all, {concurrent} at a time",))


def pipeline_tune_config(cfg: PipelineConfig, backbone: str) -> TuneJobConfig:
    """The pipeline's tune of one backbone: into the pipeline's RUN with its storage, seed and those of its training
    settings a tune takes too, except the trial sizes, which stay the tune preset's."""
    run = RunPaths.of(cfg.run_dir)
    shared = {key: value for key, value in borrowed(cfg, TrainConfig).items()
              if key in TRAIN_SETTINGS and key not in TRIAL_SIZES}
    return TuneJobConfig(data_dir=str(run.data), run_dir=str(run.root), backbone=backbone, storage=cfg.storage,
                         seed=cfg.seed, **shared)


def tune_pipeline_backbone(cfg: PipelineConfig, backbone: str) -> Path:
    """The pipeline's tune stage for one backbone (:func:`onray.pipeline.run_pipeline`,
    :func:`pipeline_tune_config`); returns the backbone's ``best.json``."""
    return tune_backbone(pipeline_tune_config(cfg, backbone))


def dry_run_pipeline_backbone(cfg: PipelineConfig, backbone: str):
    """The plan of the pipeline's tune of ``backbone`` (:func:`dry_run`; RUN/data may not be prepared yet)."""
    return dry_run(pipeline_tune_config(cfg, backbone), unprepared_ok=True)


def _check_same_tune(out: Path, identity: dict) -> None:
    """A RUN holds one tune per backbone: a rerun with other settings must not mix into it."""
    try:
        previous = json.loads((out / "tune_config.json").read_text())
    except (OSError, ValueError):
        return
    if previous != identity:
        changed = sorted(k for k in {*previous, *identity} if previous.get(k) != identity.get(k))
        if "train" in changed:
            changed.remove("train")
            changed += sorted(k for k in {*previous["train"], *identity["train"]}
                              if previous["train"].get(k) != identity["train"].get(k))
        raise UserError(f"{out} holds a tune with other settings ({', '.join(changed)} differ): "
                        f"rerun with the same flags to resume it, or use another --run-dir")
