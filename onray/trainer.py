"""The driver side of metric-learning fine-tuning: one Ray Train ``TorchTrainer`` per backbone, several at once.

:func:`train_backbones` plans the workers, skips finished backbones, runs the others side by side
(each :func:`fit_backbone` in a zero-CPU task) and keeps going when one fails. Each writes
``RUN/models/<backbone>/``: ``model.pt`` (best epoch by val mAP@5), ``metrics.jsonl``, ``loss_curve.png``,
``config.json`` and, last, ``summary.json`` (its presence marks a finished run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lib.augment import AugmentSettings
from lib.backbones import build_model, fetch_imagenet_weights
from lib.batching import planned_steps
from lib.checkpoints import checkpoint_epoch, load_train_state, newest_complete_checkpoint
from lib.config import from_dict, to_dict
from lib.console import detail, log
from lib.data.reader import PreparedData
from lib.data.subsets import per_class_subset, write_subset
from lib.data.units import row_groups
from lib.devices import gpu_share
from lib.errors import UserError, WorkFailed, disk_error, failure_reason
from lib.io import atomic_copy, atomic_open, ensure_writable_dir, write_json
from lib.paths import RunPaths
from lib.planning import ClusterShape, JobPlan, TrainPlan, plan_training, training_job_plan
from lib.tracking import Tracker
from lib.training import METRIC, TrainConfig, WorkerContext, best_epoch
from onray.data import augmented_dataset, default_num_blocks
from onray.plan import check_cuda_on_a_gpu_node, cluster_shape, ensure_resources
from onray.progress import TrainingBars
from onray.runtime import check_cluster_paths, check_shared_storage, init_ray, on_cluster
from onray.train_loop import train_loop_per_worker

# Settings that do not change what a training run computes: a rerun that differs only in them is the same run.
NOT_RESULT_KEYS = ("max_failures", "inject_failure", "storage", "gpus_per_worker", "mlflow", "cache_budget")
# Where the files are, not what trains: a RUN copied or moved elsewhere (or its DATA) is the same run. What the
# data is counts instead, by the fingerprint of DATA's manifest (:func:`run_identity`).
LOCATION_KEYS = ("run_dir", "data_dir")
# How often the driver moves the per-backbone progress bars while it waits for the trainers.
BAR_POLL_S = 1.0


@dataclasses.dataclass(frozen=True)
class Subset:
    """A training subset of one split, written once under ``RUN/subsets/``: its Parquet ``files`` and ``rows``."""

    files: tuple[str, ...]
    rows: int


@dataclasses.dataclass(frozen=True)
class Subsets:
    """What :func:`training_subsets` chose for a training run: the train and val subsets (None: the whole split)."""

    train: Subset | None
    val: Subset | None

    def of(self, split: str) -> Subset | None:
        return {"train": self.train, "val": self.val}[split]


class BackboneFailed(WorkFailed):
    """Some backbones' training failed (``failures``: backbone -> why); the others' results stand."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        super().__init__("some backbones failed: " + "; ".join(f"{bb}: {why}" for bb, why in failures.items()))


def model_dir(cfg: TrainConfig) -> Path:
    return RunPaths.of(cfg.run_dir).model(cfg.backbone)


def _result_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_RESULT_KEYS + LOCATION_KEYS}


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What makes a training run this run: its resolved settings (not where RUN and DATA are, nor the settings
    of :data:`NOT_RESULT_KEYS`) and the fingerprint of its data (``DATA/manifest.json``)."""
    return {**_result_settings(to_dict(cfg)), "data": PreparedData.open(cfg.data_dir).fingerprint()}


def finished(cfg: TrainConfig) -> bool:
    """True when ``summary.json`` says this backbone was trained as this run (:func:`run_identity`)."""
    try:
        summary = json.loads((model_dir(cfg) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("identity") == run_identity(cfg) and (model_dir(cfg) / "model.pt").is_file()


def train_run_name(cfg: TrainConfig) -> str:
    """Ray Train's run name for ``cfg``: ``<backbone>-<digest of run_identity(cfg)>``. An interrupted run
    resumes from its checkpoints only when rerun as the same run, wherever its RUN now is; a changed one starts
    afresh."""
    settings = json.dumps(run_identity(cfg), sort_keys=True, default=str)
    return f"{cfg.backbone}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"


def check_weights(cfg: TrainConfig) -> None:
    """Fail before any cluster work when weights cannot be had (offline) or do not fit."""
    for backbone in cfg.backbones:
        if cfg.weights == "imagenet":
            fetch_imagenet_weights(backbone)
        elif cfg.weights != "none":
            build_model(backbone, cfg.weights, cfg.embedding_dim)


def build_trainer(cfg: TrainConfig, use_gpu: bool, num_classes: int, trainers_per_node: int = 1, *,
                  name: str, storage: str, subsets: Subsets, callbacks: list | None = None,
                  progress=None) -> TorchTrainer:
    """The ``TorchTrainer`` of one training run of ``cfg`` (used by :func:`fit_backbone` and each Tune trial).

    Builds the Ray Datasets (augmented train subset, resized val subset); the run keeps its checkpoints
    under ``storage/name``, so a second trainer with the same name and storage resumes from them.
    ``subsets``: :func:`training_subsets` of ``cfg``, written by the job's driver before any trainer starts.
    ``callbacks`` are Ray Train callbacks (a Tune trial passes ``TuneReportCallback``); ``progress`` is the
    :class:`onray.progress.ProgressBoard` the workers report their steps to (None: they log a line now and then).
    """
    # The job logs its own per-epoch progress; per-epoch dataset bars would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = PreparedData.open(cfg.data_dir)
    settings = AugmentSettings(image_size=cfg.image_size)
    datasets = {}
    rows = subsets.train.rows if subsets.train else data.rows("train")
    if rows // cfg.num_workers < cfg.batch_size:
        raise UserError(f"{rows} train images give each of {cfg.num_workers} workers fewer than "
                        f"--batch-size {cfg.batch_size}: lower --batch-size or --num-workers")
    # augmenting on the device, the workers read their train rows themselves, row group by row group (cached or
    # streamed, onray.train_loop.EpochBatches); Ray Data's map tasks augment them otherwise
    splits = (("train", True), ("val", False)) if cfg.augment_on == "data" else (("val", False),)
    for split, augment in splits:
        subset = subsets.of(split)
        files = list(subset.files) if subset else None
        datasets[split] = augmented_dataset(data, split, settings, augment=augment, files=files,
                                            shuffle="blocks" if augment else "none",
                                            stored=cfg.augment_on == "device")
    units = ()
    if cfg.augment_on == "device":
        units = tuple(tuple(unit.as_list()) for unit in row_groups(
            list(subsets.train.files) if subsets.train else data.files("train"), cfg.num_workers))
    resources = {"CPU": 1, "GPU": gpu_share(cfg.gpus_per_worker) or 1} if use_gpu else {"CPU": 1}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=WorkerContext(cfg, num_classes, rows // cfg.num_workers, trainers_per_node,
                                        progress, units, data.image_shape).as_loop_config(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                               checkpoint_score_order="max")),
        datasets=datasets,
    )


def training_subsets(cfg: TrainConfig, data: PreparedData) -> Subsets:
    """For train and val: the files of the ``--train-per-class`` / ``--val-per-class`` subset and its row count
    (None when the whole split is used). Called by the job's driver, which hands the result to every trainer or
    Tune trial; the first call writes the files under ``RUN/subsets/`` (named after DATA's fingerprint, the split,
    the size per class, the seed and the number of files), a resumed run finds them there."""
    chosen: dict[str, Subset | None] = {}
    for split, per_class in (("train", cfg.train_per_class), ("val", cfg.val_per_class)):
        if not per_class:
            chosen[split] = None
            continue
        ids, labels = data.ids_and_labels(split)
        keep = per_class_subset(ids, labels, per_class, cfg.seed)
        parts = default_num_blocks(len(keep))
        name = f"{split}-{per_class}-per-class-seed{cfg.seed}-{parts}-files-{data.fingerprint()[:12]}"
        files = write_subset(data, split, keep, RunPaths.of(cfg.run_dir).subset(name), parts)
        chosen[split] = Subset(tuple(files), len(keep))
    return Subsets(**chosen)


def local_run_folder(storage: str, name: str) -> Path | None:
    """``storage/name`` when ``storage`` is a local path (or ``file://``); None for a URI such as ``s3://``."""
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    elif "://" in storage:
        return None
    return Path(storage).expanduser() / name


def check_resume_checkpoint(storage: str, name: str, backbone: str = "") -> None:
    """Before a run resumes: find its newest complete ``checkpoint_*`` folder (the one the workers will resume
    from, :func:`lib.checkpoints.newest_complete_checkpoint`), say which newer folders it passes over and why,
    and load it the way the workers will (:func:`lib.checkpoints.load_train_state`, ``weights_only``), so a
    crafted or damaged checkpoint raises one-line :class:`UserError` in the driver instead of crashing every
    worker the failure policy restarts. Checks local storage only; a remote one is left to the workers."""
    folder = local_run_folder(storage, name)
    if folder is None or not folder.is_dir():
        return
    newest, passed_over = newest_complete_checkpoint(folder)
    prefix = f"{backbone}: " if backbone else ""
    for skipped, problem in passed_over:
        log(f"{prefix}passing over incomplete checkpoint {skipped.name} ({problem})")
    if newest is not None:
        load_train_state(newest, "cpu", run_folder=folder)
        if passed_over:
            log(f"{prefix}resuming from the newest complete checkpoint, {newest.name} (epoch {checkpoint_epoch(newest)})")


def fit_backbone(cfg: TrainConfig, use_gpu: bool, num_classes: int, subsets: Subsets, trainers_per_node: int = 1,
                 progress=None) -> dict[str, Any]:
    """Train ``cfg.backbone`` (resuming a run in the same storage) and write its outputs; returns the summary.

    ``trainers_per_node``: how many trainers share each machine's cores (CPU workers split them).
    """
    out = model_dir(cfg)
    name, storage = train_run_name(cfg), cfg.storage or str(out)
    check_resume_checkpoint(storage, name, cfg.backbone)  # a bad checkpoint fails here once, not in every worker
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # an earlier config's outputs are stale from here on
    trainer = build_trainer(cfg, use_gpu, num_classes, trainers_per_node, name=name, storage=storage,
                            subsets=subsets, progress=progress)
    started = time.perf_counter()
    result = trainer.fit()
    raise_disk_error(result)
    return write_outputs(cfg, result, time.perf_counter() - started)


def raise_disk_error(result) -> None:
    """The one-line :class:`UserError` of a full or read-only disk that stopped the workers
    (:func:`onray.train_loop.train_loop_per_worker` returns it instead of raising, so that Ray Train's failure
    policy does not retry it), if any."""
    returned = getattr(result, "return_value", None)
    if isinstance(returned, dict) and returned.get("disk_error"):
        raise UserError(str(returned["disk_error"]))


def write_outputs(cfg: TrainConfig, result, seconds: float) -> dict[str, Any]:
    """From a finished Ray Train result: best model, per-epoch metrics, curve PNG, config, summary (last)."""
    from lib.plots import loss_curve_figure, save_figure

    out = model_dir(cfg)
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / "history.json").read_text())
    best_row = best_epoch(history)
    best_checkpoint = max(result.best_checkpoints, key=lambda pair: pair[1].get(METRIC, -1.0))[0]
    with best_checkpoint.as_directory() as folder:
        atomic_copy(Path(folder) / "model.pt", out / "model.pt")
    with atomic_open(out / "metrics.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in history)
    save_figure(loss_curve_figure(history, title=f"{cfg.backbone} ({cfg.preset}, weights {cfg.weights})"),
                out / "loss_curve.png")
    write_json(out / "config.json", to_dict(cfg))
    summary = {"backbone": cfg.backbone, "epochs_run": history[-1]["epoch"], "best_epoch": best_row["epoch"],
               "untrained": {k: history[0][k] for k in (METRIC, "val_p@5", "val_loss")},
               "best": {k: best_row[k] for k in (METRIC, "val_p@5", "val_loss", "train_loss")},
               # every epoch's time, those before a resume included; this run's wall time beside it
               "train_seconds": round(sum(row.get("epoch_seconds", 0.0) for row in history), 1),
               "wall_seconds_this_run": round(seconds, 1), "checkpoint": best_checkpoint.path,
               "train_data": train_data_summary(history), "config": to_dict(cfg), "identity": run_identity(cfg)}
    write_json(out / "summary.json", summary)
    log(f"{cfg.backbone}: best val mAP@5 {best_row[METRIC]:.3f} at epoch {best_row['epoch']} "
        f"(untrained {history[0][METRIC]:.3f}) -> {out}")
    return summary


def train_data_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """How the train rows reached the workers (``mode``: cached, streamed or ray_data) and the most memory a
    worker held in any epoch: ``peak_rss_gb`` on CPUs, ``gpu_peak_memory_gb`` on GPUs, and for a streamed run
    its epochs' largest buffer, ``stream_buffer_gb``."""
    trained = [row for row in history if row.get("epoch", 0) >= 1]
    summary: dict[str, Any] = {"mode": trained[-1].get("data_mode") if trained else None}
    for key in ("peak_rss_gb", "gpu_peak_memory_gb", "stream_buffer_gb"):
        values = [row[key] for row in trained if key in row]
        if values:
            summary[key] = max(values)
    return summary


@ray.remote(num_cpus=0)
def _fit_remote(config: dict, use_gpu: bool, num_classes: int, subsets: Subsets, trainers_per_node: int,
                progress) -> dict[str, Any]:
    return fit_backbone(from_dict(TrainConfig, config), use_gpu, num_classes, subsets, trainers_per_node, progress)


def plan_of(cfg: TrainConfig) -> tuple[TrainPlan, ClusterShape]:
    """The running cluster's plan for ``cfg`` (:func:`lib.planning.plan_training` over the nodes up and the node types
    its autoscaler can add) and that cluster's shape, without asking for anything. The ``full`` preset never falls
    back to CPUs without ``--use-gpu false``."""
    shape = cluster_shape(cfg.use_gpu, (cfg.num_workers or 1) * len(cfg.backbones))
    planned = plan_training(cfg.use_gpu, cfg.num_workers, len(cfg.backbones), shape, cfg.gpus_per_worker)
    if cfg.preset == "full" and not planned.use_gpu and cfg.use_gpu == "auto":
        raise UserError("--preset full fine-tunes ImageNet networks at 224 px and needs GPUs, but the Ray cluster has "
                        "none and cannot scale to any: use --use-gpu false to train on CPUs anyway, or --preset quick")
    return planned, shape


def plan(cfg: TrainConfig) -> TrainPlan:
    """:func:`plan_of`, then what it places on nodes the cluster does not have yet asked of its autoscaler in the
    plan's shapes (:meth:`lib.planning.TrainPlan.bundles`) and waited for, and a GPU probed."""
    planned, _ = plan_of(cfg)
    if planned.use_gpu:
        ensure_resources(planned.bundles(), planned.gpus_needed(len(cfg.backbones)))
        check_cuda_on_a_gpu_node()
    return planned


def train_rows(cfg: TrainConfig, data: PreparedData) -> int:
    """Train images per epoch of ``cfg`` (its ``--train-per-class`` subset's size, else the split's), from the
    manifest's counts: nothing is read or written."""
    counts = (data.manifest.get("counts") or {}).get("train") or {}
    if not cfg.train_per_class or not counts:
        return data.rows("train")
    return sum(min(cfg.train_per_class, int(count)) for count in counts.values())


def dry_run(given: TrainConfig) -> JobPlan:
    """``jobs.train --dry-run``: attach to or start Ray and return the plan of ``given`` (per backbone its workers,
    GPU share, nodes, images and steps per epoch; what runs at once; what the autoscaler would be asked for), having
    trained nothing, written nothing into RUN and asked the autoscaler for nothing."""
    check_cluster_paths(data_dir=given.data_dir, run_dir=given.run_dir, storage=given.storage)
    given = dataclasses.replace(given, run_dir=str(RunPaths.of(given.run_dir).root),
                                data_dir=str(Path(given.data_dir).expanduser().absolute()))
    cfg = given.resolve()
    data = PreparedData.open(cfg.data_dir)
    init_ray()
    planned, shape = plan_of(cfg)
    return describe_training("jobs.train", given, planned, shape, data)


def describe_training(job: str, given: TrainConfig, planned: TrainPlan, shape: ClusterShape,
                      data: PreparedData | None) -> JobPlan:
    """The :class:`lib.planning.JobPlan` of training ``given``'s backbones as ``planned`` (steps from ``data`` when
    it is prepared; None: not yet, as in a pipeline's dry run)."""
    configs = [given.for_backbone(bb).resolve() for bb in given.backbones]
    rows = train_rows(configs[0], data) if data else None
    # the training's own count (lib.training.build_training): at least one step
    steps = [max(1, planned_steps(rows // planned.workers_of(i), len(data.classes), c.batch_size, c.samples_per_class))
             if data else None for i, c in enumerate(configs)]
    notes = () if data else (f"images per epoch: {configs[0].train_per_class or 'all'} per class of the prepared "
                             f"train split (not prepared yet)",)
    return training_job_plan(job, list(given.backbones), planned, shape, shape.gpus,
                             [c.epochs for c in configs], [c.batch_size for c in configs], rows, steps, notes=notes)


def train_backbones(given: TrainConfig) -> list[TrainConfig]:
    """Train every backbone of ``given`` (each resolved on its own), as many at once as the cluster fits.

    Returns each backbone's resolved config; raises :class:`BackboneFailed` naming the backbones that failed
    after the others finished.
    """
    check_cluster_paths(data_dir=given.data_dir, run_dir=given.run_dir, storage=given.storage)
    given = dataclasses.replace(given, run_dir=str(RunPaths.of(given.run_dir).root),
                                data_dir=str(Path(given.data_dir).expanduser().absolute()))
    cfg = given.resolve()
    data = PreparedData.open(cfg.data_dir)
    check_weights(cfg)
    models = ensure_writable_dir(RunPaths.of(cfg.run_dir).models)
    tracker = Tracker.connect(cfg.mlflow, cfg.run_dir)  # None without --mlflow; a dead server is one line here
    init_ray()
    shape = plan(cfg)
    # after the plan's GPU nodes are up: the nodes whose workers write checkpoints are checked too
    check_shared_storage(models, data.root, cfg.storage)
    # each backbone resolves on its own: a preset may size epochs per backbone (BACKBONE_PRESETS)
    configs = {bb: dataclasses.replace(given.for_backbone(bb).resolve(), num_workers=shape.workers_of(i),
                                       gpus_per_worker=f"{shape.gpus_per_worker:g}" if shape.use_gpu else "auto")
               for i, bb in enumerate(cfg.backbones)}
    todo = [bb for bb in cfg.backbones if not finished(configs[bb])]
    for done in sorted(set(cfg.backbones) - set(todo)):
        log(f"{done}: already trained with this config ({model_dir(configs[done])}); skipping")
    # each trainer's subsets, written here once (backbones with the same sizes share them), not in each trainer
    started, by_sizes, subsets = time.perf_counter(), {}, {}
    for bb in todo:
        sizes = (configs[bb].train_per_class, configs[bb].val_per_class, configs[bb].seed)
        if sizes not in by_sizes:
            by_sizes[sizes] = training_subsets(configs[bb], data)
        subsets[bb] = by_sizes[sizes]
    if any(chosen.train or chosen.val for chosen in by_sizes.values()):
        detail(f"training subsets ready in {time.perf_counter() - started:.1f} s")
    share = f" ({shape.gpus_per_worker:.3g} GPU each)" if shape.use_gpu and shape.gpus_per_worker < 1 else ""
    names = ", ".join(f"{bb} ({configs[bb].epochs} epochs, {configs[bb].num_workers} worker(s))" for bb in todo)
    log(f"training {names or 'nothing'} on {'GPU' if shape.use_gpu else 'CPU'} workers{share}, up to "
        f"{shape.concurrent} at a time; preset {cfg.preset}, weights {cfg.weights}, augmenting on the "
        f"{'training device' if cfg.augment_on == 'device' else 'Ray Data CPUs'}")

    # A local Ray runs every trainer on this machine: CPU workers split its cores instead of each
    # taking all of them (oversubscribed threads slow everyone down). On a cluster they spread out.
    sharing = 1 if shape.use_gpu or on_cluster() else max(1, min(shape.concurrent, len(todo)))
    # Each trainer's driver (and so every output file of the backbone) stays on this node: only checkpoints travel.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    pending, running, failures = list(todo), {}, {}
    bars = TrainingBars(todo)
    try:
        while pending or running:
            while pending and len(running) < shape.concurrent:
                backbone = pending.pop(0)
                ref = _fit_remote.options(scheduling_strategy=here).remote(
                    to_dict(configs[backbone]), shape.use_gpu, len(data.classes), subsets[backbone], sharing,
                    bars.board)
                running[ref] = backbone
            ready, _ = ray.wait(list(running), num_returns=1, timeout=BAR_POLL_S)
            bars.poll()
            if ready:
                backbone = running.pop(ready[0])
                bars.close(backbone)
                _collect(ready[0], backbone, failures)
    finally:
        bars.close()
    if tracker:  # from the files just written, skipped (finished) backbones included: a rerun logs what was missed
        for backbone in cfg.backbones:
            if backbone in failures:
                tracker.log_failed_training(backbone, to_dict(configs[backbone]), failures[backbone])
            else:
                tracker.log_training(backbone)
    if failures:
        raise BackboneFailed(failures)
    return list(configs.values())


def _collect(ref, backbone: str, failures: dict[str, str]) -> None:
    """The result of one trainer: a bad input or a full disk stops the job; another failure is noted in
    ``failures`` and the other trainers go on."""
    try:
        ray.get(ref)
    except ray.exceptions.RayError as err:
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, UserError):
            raise cause from None
        if disk_error(cause) is not None:
            raise disk_error(cause) from None
        failures[backbone] = failure_reason(cause)
        log(f"{backbone}: FAILED - {failures[backbone]}")
        traceback.print_exception(cause, file=sys.stderr, limit=-3)
