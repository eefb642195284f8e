"""The Ray Train worker loop of one backbone's metric-learning fine-tuning (runs on every DDP worker).

Each epoch: class-balanced P x K batches of the train shard (:func:`lib.training.train_epoch`), then val loss
and val mAP@5 over the whole val split, then a report to Ray Train with rank 0's checkpoint. A restarted worker
group resumes from the last checkpoint (network, objective with its proxies, optimiser, schedule, history).
What trains is :func:`lib.training.build_training`'s, the same as the train benchmark's plain loop.

With ``augment_on="device"`` (the default) the shard carries the stored images: the worker gathers its
rows onto its device once, then each epoch picks P x K batches of them by index and augments (and resizes)
them there; the val split is resized there once. With ``"data"`` Ray Data's map tasks augment on CPUs and the worker
re-batches the stream. Per-step statistics stay on the device and are read once per epoch.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from lib.augment import AugmentSettings, fresh_generator, normalize, resize_batch
from lib.batching import balanced_batches, epoch_batches
from lib.checkpoints import (
    checkpoint_name,
    checkpoint_problem,
    load_train_state,
    newest_complete_checkpoint,
    publish_checkpoint,
    write_checkpoint,
)
from lib.console import log
from lib.devices import available_cpus, cuda_unusable_reason
from lib.errors import disk_error
from lib.losses import COLLAPSE_SPREAD
from lib.paths import RunPaths
from lib.precision import forward
from lib.training import (
    METRIC,
    TrainConfig,
    Training,
    WorkerContext,
    augmented_batches,
    best_epoch,
    build_training,
    epoch_metrics,
    train_epoch,
    val_retrieval_metrics,
)
from onray.progress import StepReporter

PROGRESS_EVERY_S = 30.0


def _world() -> tuple[int, int]:
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def _all_have_batches(iterator, device: torch.device):
    """Yield from ``iterator`` while *every* rank still has a batch: DDP needs equal step counts."""
    _, world = _world()
    for batch in iterator:
        if world > 1:
            flag = torch.ones(1, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() == 0:  # the one wait of a step here: the ranks must agree to stop (--augment-on data)
                return
        yield batch
    if world > 1:
        flag = torch.zeros(1, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)


def _sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def _fewest_across_ranks(count: int, device: torch.device) -> int:
    tensor = torch.tensor([count], dtype=torch.int64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def whole_shard(shard, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This epoch's rows of ``shard`` on ``device``: images as stored and (N,) labels, copied from pinned memory
    on a GPU so the copy does not hold up the host."""
    parts = list(shard.iter_torch_batches(batch_size=None, device="cpu"))
    if not parts:
        return torch.zeros((0, 1, 1, 3), dtype=torch.uint8, device=device), torch.zeros(0, dtype=torch.long,
                                                                                        device=device)
    images, labels = torch.cat([p["image"] for p in parts]), torch.cat([p["label"] for p in parts]).long()
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, str] | None:
    """One worker's training; rank 0 returns ``{"disk_error": one line}`` when a full or read-only disk stopped it
    (every rank stops at the same epoch, and Ray Train's failure policy never retries it), else None."""
    context = WorkerContext.from_loop_config(config)  # a typo or a bad value fails here, at once
    cfg, (rank, world) = context.train, _world()
    device = _worker_device(context)
    training = build_training(cfg, context.num_classes, context.rows_per_worker, device,
                              wrap=ray.train.torch.prepare_model)
    val = _val_split(cfg, device)
    history, resumed_from = _resume_or_start(training, val, cfg, device, rank)
    batches = EpochBatches(cfg, training, device, rank)
    # rank 0's position goes to the driver's progress bars when it gave a board (jobs.train); else a line now and then
    reporter = StepReporter(context.progress if rank == 0 else None, cfg.backbone, cfg.epochs,
                            training.steps_per_epoch, cfg.batch_size * world)
    for epoch in range(history[-1]["epoch"] + 1, cfg.epochs + 1):
        _maybe_inject_failure(cfg, epoch, rank)
        started = time.perf_counter()
        reporter.step(epoch, 0, force=True)
        totals = train_epoch(training.model_step, batches(epoch), training.objective_step, training.optimizer,
                             training.scheduler, device, training.bf16,
                             on_step=_progress(cfg, reporter, epoch, training.steps_per_epoch, rank))
        seconds = time.perf_counter() - started
        reporter.step(epoch, training.steps_per_epoch, force=True)
        totals = dict(zip(totals, _sum_across_ranks(list(totals.values()), device), strict=True))
        if totals["steps"] == 0:
            raise RuntimeError(f"epoch {epoch} had no class-balanced batch of {cfg.batch_size} "
                               f"({training.samples_per_class} per class): lower --batch-size or use more data")
        row = {"epoch": epoch, **epoch_metrics(totals, training.objective), "lr": training.scheduler.get_last_lr()[0],
               "steps": int(totals["steps"] / world), "images_per_s": totals["images"] / seconds,
               "epoch_seconds": seconds, **evaluate(training, val, device)}
        if device.type == "cuda":
            row["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        if resumed_from is not None:  # the first epoch after a restart or a rerun says so in the metrics
            row["resumed_from"], resumed_from = resumed_from, None
        history.append(row)
        stop = bool(cfg.patience) and epoch - best_epoch(history)["epoch"] >= cfg.patience
        if rank == 0:
            log(epoch_line(cfg, row, training.objective.epoch_metrics(totals), stop))
        disk_problem = _report(row, training, history, rank, device)
        if disk_problem:
            return {"disk_error": disk_problem} if rank == 0 else None
        if stop:
            break
    return None


def epoch_line(cfg: TrainConfig, row: dict[str, Any], objective_metrics: dict[str, float], stop: bool) -> str:
    """The log line of one trained epoch; the objective's own metrics (``active fraction 0.412``) in the middle."""
    own = "".join(f", {name.replace('_', ' ')} {value:.3f}" for name, value in objective_metrics.items())
    collapsed = row["spread"] < COLLAPSE_SPREAD  # every image mapped to (nearly) one point
    return (f"{cfg.backbone} epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f} "
            f"(val {row['val_loss']:.4f}), val mAP@5 {row[METRIC]:.3f} P@5 {row['val_p@5']:.3f}{own}, "
            f"spread {row['spread']:.3f}, {row['images_per_s']:.0f} img/s"
            + (" - embeddings collapsed: lower --lr or change --loss (or --miner)" if collapsed else "")
            + (f" - early stop: no better val mAP@5 for {cfg.patience} epochs" if stop else ""))


def _worker_device(context: WorkerContext) -> torch.device:
    """This worker's device, set up: cuDNN autotuning on a GPU, the worker's share of the cores on a CPU."""
    if ray.get_gpu_ids() and not torch.cuda.is_available():
        raise RuntimeError(cuda_unusable_reason())  # never a silent CPU fallback on a GPU worker
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: let cuDNN pick its fastest kernels
    else:
        # Ray pins a CPU worker to one thread; give each worker its share of the node's cores
        # (shared with the other backbones' workers when several train on one machine).
        sharing = ray.train.get_context().get_local_world_size() * context.trainers_per_node
        torch.set_num_threads(max(1, available_cpus() // sharing))
    return device


def _val_split(cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the val split on ``device``, read once; resized once, here, when the worker augments."""
    images, labels = whole_shard(ray.train.get_dataset_shard("val"), device)
    if cfg.augment_on == "device" and len(labels):
        images = resize_batch(images, cfg.image_size)
    return images, labels


def _resume_or_start(training: Training, val, cfg: TrainConfig, device: torch.device, rank: int
                     ) -> tuple[list[dict[str, Any]], int | None]:
    """The history to continue and the epoch resumed from: the newest complete checkpoint's (loaded into
    ``training``), or a fresh history whose epoch 0 is the untrained network's val metrics (and None)."""
    folder = _resume_folder()
    if folder is None:
        history = [{"epoch": 0, **evaluate(training, val, device)}]
        if rank == 0:
            log(f"{cfg.backbone}: untrained val mAP@5 {history[0][METRIC]:.3f}, P@5 {history[0]['val_p@5']:.3f}")
        return history, None
    with folder as path:  # weights_only loading: a checkpoint never runs code
        history = training.restore(*load_train_state(path, device, run_folder=Path(path).parent))
        if rank == 0:
            log(f"{cfg.backbone}: resuming after epoch {history[-1]['epoch']} from {path}")
    return history, history[-1]["epoch"]


def _resume_folder():
    """A context giving the local folder of the checkpoint to resume from, or None for a fresh start.

    On local storage, the newest complete checkpoint of this run's folder (:func:`lib.checkpoints.
    newest_complete_checkpoint`): the one Ray Train last registered, or a newer one whose report a crash cut
    off; a folder a full disk left incomplete is passed over. On remote storage (``s3://``), Ray Train's own,
    downloaded, and used only when complete."""
    storage = ray.train.get_context().get_storage()
    local = _local_path(storage.storage_filesystem, storage.experiment_fs_path)
    if local is not None:
        folder, _ = newest_complete_checkpoint(local)
        return None if folder is None else contextlib.nullcontext(str(folder))
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    return _complete_download(checkpoint)


@contextlib.contextmanager
def _complete_download(checkpoint):
    with checkpoint.as_directory() as path:
        problem = checkpoint_problem(path)
        if problem is not None:
            raise RuntimeError(f"checkpoint {checkpoint.path} is not complete ({problem})")
        yield path


def _local_path(filesystem, path: str) -> Path | None:
    """``path`` as a local folder when ``filesystem`` is the local one (pyarrow's), else None."""
    import pyarrow.fs

    return Path(path) if isinstance(filesystem, pyarrow.fs.LocalFileSystem) else None


class EpochBatches:
    """``batches(epoch)``: this worker's P x K training batches of one epoch, equally many on every rank.

    With ``augment_on="device"`` the shard's rows as stored are gathered from Ray Data once, onto the device:
    every epoch draws new P x K batches and new views of them there, with no Ray Data step inside an epoch.
    With ``"data"`` each epoch re-batches Ray Data's augmented stream."""

    def __init__(self, cfg: TrainConfig, training: Training, device: torch.device, rank: int):
        self.cfg, self.training, self.device, self.rank = cfg, training, device, rank
        self.shard = ray.train.get_dataset_shard("train")
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, epoch: int) -> Iterable[dict[str, torch.Tensor]]:
        cfg, k, steps_per_epoch = self.cfg, self.training.samples_per_class, self.training.steps_per_epoch
        seed = cfg.seed * 1000 + epoch * 10 + self.rank
        if cfg.augment_on == "device":
            stored, labels = self.rows = self.rows or whole_shard(self.shard, self.device)
            index = epoch_batches(labels, cfg.batch_size, k, seed=seed)
            steps = _fewest_across_ranks(min(len(index), steps_per_epoch), self.device)  # DDP: equal step counts
            return augmented_batches(stored, labels, index[:steps], AugmentSettings(image_size=cfg.image_size),
                                     fresh_generator(seed, self.device))
        stream = self.shard.iter_torch_batches(batch_size=cfg.batch_size, device="cpu", prefetch_batches=2,
                                               local_shuffle_buffer_size=4 * cfg.batch_size)
        return _all_have_batches(balanced_batches(stream, cfg.batch_size, k, seed=seed, max_steps=steps_per_epoch),
                                 self.device)


def _progress(cfg: TrainConfig, reporter: StepReporter, epoch: int, steps_per_epoch: int, rank: int
              ) -> Callable[[int, torch.Tensor], None]:
    """``train_epoch``'s ``on_step``: moves the driver's bar, or (without one) logs the loss now and then."""
    last_log = time.perf_counter()

    def on_step(step: int, totals: torch.Tensor) -> None:
        nonlocal last_log
        reporter.step(epoch, step)
        if rank == 0 and reporter.board is None and time.perf_counter() - last_log > PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            log(f"{cfg.backbone} epoch {epoch}: step {step}/~{steps_per_epoch}, loss {totals[0] / totals[1]:.4f}")

    return on_step


@torch.no_grad()
def evaluate(training: Training, val: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Val loss and val retrieval metrics over the whole val split (every rank's part gathered); ``val`` is this
    rank's (N, 3, S, S) uint8 images and (N,) labels on ``device``."""
    model, objective = training.model, training.objective
    model.eval()
    images, labels = val
    embeddings, loss_sum, batches = [], torch.zeros((), device=device), 0
    for start in range(0, len(labels), 256):
        embedding = forward(model, normalize(images[start:start + 256]), training.bf16)
        loss, _ = objective(embedding, labels[start:start + 256])
        loss_sum, batches = loss_sum + loss.detach(), batches + 1
        embeddings.append(embedding)
    local = (torch.cat(embeddings).cpu().numpy() if embeddings else np.zeros((0, 1), np.float32),
             labels.cpu().numpy())
    gathered = [local]
    if _world()[1] > 1:
        gathered = [None] * _world()[1]
        dist.all_gather_object(gathered, local)
    all_embeddings = np.concatenate([g[0] for g in gathered if len(g[1])])
    all_labels = np.concatenate([g[1] for g in gathered])
    loss_sum, batches = _sum_across_ranks([float(loss_sum), batches], device)
    return {"val_loss": loss_sum / max(1, batches), **val_retrieval_metrics(all_embeddings, all_labels, device=device)}


def _maybe_inject_failure(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Testing aid: raise once (a marker file remembers) to exercise FailureConfig restarts."""
    if not cfg.inject_failure or cfg.inject_failure != f"{cfg.backbone}:{epoch}" or rank != 0:
        return
    marker = RunPaths.of(cfg.run_dir).model(cfg.backbone) / f".failure-injected-at-{epoch}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("injected\n")
    raise RuntimeError(f"injected failure at epoch {epoch} (--inject-failure)")


def _report(row: dict[str, Any], training: Training, history: list[dict[str, Any]], rank: int,
            device: torch.device) -> str | None:
    """Every rank reports (a barrier); rank 0 first publishes the checkpoint into the run's storage
    (:func:`_publish`) and attaches it. A full or read-only disk while publishing is returned on every rank, as
    one line on rank 0 (the ranks agree on it first), with nothing reported: the caller stops."""
    problem, checkpoint = None, None
    if rank == 0:
        try:
            checkpoint = _publish(training.model.state_dict(), training.train_state(history))
        except OSError as err:
            if disk_error(err) is None:
                raise
            problem = str(disk_error(err))
    if _sum_across_ranks([1.0 if problem else 0.0], device)[0] > 0:
        return problem or "rank 0 could not write its checkpoint"
    if checkpoint is None:
        ray.train.report(row)
    else:
        ray.train.report(row, checkpoint=checkpoint, checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    return None


def _publish(model_state: dict[str, Any], train_state: dict[str, Any]) -> ray.train.Checkpoint:
    """Write this epoch's checkpoint into the run's storage folder, whole or not at all, and return it.

    Local storage: :func:`lib.checkpoints.publish_checkpoint` (a hidden temporary folder, checked, then renamed).
    Remote storage: written to a local temporary folder, then uploaded with ``checkpoint.json`` last, so a
    checkpoint there without that file is one whose upload did not finish. Ray Train then registers the folder
    as it is (``CheckpointUploadMode.NO_UPLOAD``): it never copies a checkpoint itself."""
    import pyarrow.fs

    from lib.checkpoints import MANIFEST_FILE

    storage = ray.train.get_context().get_storage()
    filesystem, name = storage.storage_filesystem, checkpoint_name()
    destination = f"{storage.experiment_fs_path}/{name}"
    local = _local_path(filesystem, storage.experiment_fs_path)
    if local is not None:
        publish_checkpoint(local, name, model_state, train_state)
    else:
        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(folder, model_state, train_state)
            filesystem.create_dir(destination)
            for path in sorted(Path(folder).iterdir(), key=lambda p: p.name == MANIFEST_FILE):
                pyarrow.fs.copy_files(str(path), f"{destination}/{path.name}",
                                      destination_filesystem=filesystem)
    return ray.train.Checkpoint(path=destination, filesystem=filesystem)
