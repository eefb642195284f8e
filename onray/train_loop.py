"""The Ray Train worker loop of one backbone's metric-learning fine-tuning (runs on every DDP worker).

Each epoch: class-balanced P x K batches of the train shard (:func:`lib.training.train_epoch`), then val loss
and val mAP@5 over the whole val split, then a report to Ray Train with rank 0's checkpoint. A restarted worker
group resumes from the last checkpoint (network, objective with its proxies, optimiser, schedule, history).
What trains is :func:`lib.training.build_training`'s, the same as the train benchmark's plain loop.

With ``augment_on="device"`` (the default) the worker reads its share of the train split's row groups as stored
through Ray Data, onto its device once when they fit ``--cache-budget``, else streamed every epoch into a buffer
of the row groups due (the same batches either way); each epoch picks P x K batches by index and augments (and
resizes) them there; the val split is resized there once. With ``"data"`` Ray Data's map tasks augment on CPUs
and the worker re-batches the stream. Per-step statistics stay on the device and are read once per epoch.
"""

from __future__ import annotations

import contextlib
import queue
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from lib.augment import AugmentSettings, fresh_generator, normalize, resize_batch
from lib.batching import balanced_batches, epoch_batches, stream_layout
from lib.checkpoints import (
    checkpoint_name,
    checkpoint_problem,
    load_train_state,
    newest_complete_checkpoint,
    publish_checkpoint,
    write_checkpoint,
)
from lib.config import format_size
from lib.console import log
from lib.data.units import RowGroup, read_unit_labels, units_of_rank
from lib.devices import available_cpus, cuda_unusable_reason, gpu_share
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
    cache_budget_bytes,
    epoch_metrics,
    streamed_batches,
    train_epoch,
    val_retrieval_metrics,
)
from onray.data import unit_dataset
from onray.progress import StepReporter

PROGRESS_EVERY_S = 30.0
# Units (row groups) Ray Data reads ahead of a streamed epoch's need: enough to hide a read behind the steps
STREAM_PREFETCH_UNITS = 2


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


def _most_across_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


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
    batches = EpochBatches(context, training, device, rank, world)
    data_mode = "streamed" if _most_across_ranks(float(batches.streamed), device) else (
        "cached" if cfg.augment_on == "device" else "ray_data")
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
        if epoch < cfg.epochs:
            batches.start(epoch + 1)  # a streamed epoch starts reading while this one is evaluated
        reporter.step(epoch, training.steps_per_epoch, force=True)
        totals = dict(zip(totals, _sum_across_ranks(list(totals.values()), device), strict=True))
        if totals["steps"] == 0:
            raise RuntimeError(f"epoch {epoch} had no class-balanced batch of {cfg.batch_size} "
                               f"({training.samples_per_class} per class): lower --batch-size or use more data")
        row = {"epoch": epoch, **epoch_metrics(totals, training.objective), "lr": training.scheduler.get_last_lr()[0],
               "steps": int(totals["steps"] / world), "images_per_s": totals["images"] / seconds,
               "epoch_seconds": seconds, **evaluate(training, val, device)}
        # which way the rows came and the most memory any worker held: flat in the shard's size when streamed
        row["data_mode"] = data_mode
        row["gpu_peak_memory_gb" if device.type == "cuda" else "peak_rss_gb"] = _most_across_ranks(
            peak_memory_gb(device), device)
        if data_mode == "streamed":  # every rank takes part (a rank within its budget held no buffer)
            row["stream_buffer_gb"] = round(_most_across_ranks(batches.held_bytes, device) / 2 ** 30, 6)
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
            + (" (streamed)" if row.get("data_mode") == "streamed" else "")
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

    With ``augment_on="device"`` the worker reads its shard (every ``world``-th row group of the train split,
    :func:`lib.data.units.units_of_rank`) through Ray Data as stored and plans each epoch's batches from its
    labels (:func:`lib.batching.epoch_batches` over those units). A shard within the cache budget
    (``--cache-budget``) is read once onto the device; a larger one is streamed: each epoch reads the units in the
    order its batches need them into a buffer that holds only the units due (:func:`lib.training.streamed_batches`).
    Either way a seed gives the same batches, pixel for pixel, and each batch is augmented on the device.
    With ``"data"`` each epoch re-batches Ray Data's augmented stream."""

    def __init__(self, context: WorkerContext, training: Training, device: torch.device, rank: int, world: int):
        self.cfg, self.training, self.device, self.rank = context.train, training, device, rank
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.streamed, self.held_bytes = False, 0
        self.started: tuple[int, Iterable[dict[str, torch.Tensor]]] | None = None  # start()'s epoch and batches
        if self.cfg.augment_on != "device":
            self.shard = ray.train.get_dataset_shard("train")
            return
        self.units = units_of_rank([RowGroup.from_list(u) for u in context.train_units], rank, world)
        self.unit_sizes = np.asarray([unit.rows for unit in self.units], dtype=np.int64)
        self.labels = read_unit_labels(self.units)
        self.image_shape = tuple(context.image_shape)
        row_bytes = int(np.prod(self.image_shape))
        shard_bytes = len(self.labels) * row_bytes
        budget = cache_budget_bytes(self.cfg.cache_budget, *_free_memory(device, context))
        self.streamed = shard_bytes > budget
        if rank == 0:
            log(f"{self.cfg.backbone}: {len(self.labels):,} train rows a worker ({format_size(shard_bytes)} as stored) "
                f"{'over' if self.streamed else 'within'} the cache budget {format_size(budget)}: "
                + ("streamed from Ray Data every epoch" if self.streamed else f"kept on the {device.type}"))

    def start(self, epoch: int) -> None:
        """Plan ``epoch`` now and, streamed, start reading its first row groups: called on every rank as the
        previous epoch's steps end, so Ray Data's start-up and first reads overlap the val pass and checkpoint
        instead of holding up the epoch's first step. Every rank plans (the plan agrees on the step count with the
        others), cached or streamed; Ray Data epochs (``--augment-on data``) start when called."""
        if self.cfg.augment_on == "device":
            self.started = (epoch, self(epoch))

    def __call__(self, epoch: int) -> Iterable[dict[str, torch.Tensor]]:
        started, self.started = self.started, None
        if started is not None and started[0] == epoch:
            return started[1]
        cfg, k, steps_per_epoch = self.cfg, self.training.samples_per_class, self.training.steps_per_epoch
        seed = cfg.seed * 1000 + epoch * 10 + self.rank
        if cfg.augment_on != "device":
            stream = self.shard.iter_torch_batches(batch_size=cfg.batch_size, device="cpu", prefetch_batches=2,
                                                   local_shuffle_buffer_size=4 * cfg.batch_size)
            return _all_have_batches(balanced_batches(stream, cfg.batch_size, k, seed=seed,
                                                      max_steps=steps_per_epoch), self.device)
        index = epoch_batches(self.labels, cfg.batch_size, k, seed=seed, unit_sizes=self.unit_sizes)
        steps = _fewest_across_ranks(min(len(index), steps_per_epoch), self.device)  # DDP: equal step counts
        index, settings, generator = index[:steps], AugmentSettings(image_size=cfg.image_size), fresh_generator(
            seed, self.device)
        if not self.streamed:
            stored, labels = self.rows = self.rows or self._read_whole_shard()
            return augmented_batches(stored, labels, index, settings, generator)
        layout = stream_layout(index, self.unit_sizes)
        self.held_bytes = max(self.held_bytes, layout.capacity * int(np.prod(self.image_shape)))
        arriving = _read_ahead(self._arriving(layout.read_order))
        return streamed_batches(index, self.labels, self.unit_sizes, layout, arriving, self.image_shape, settings,
                                generator, self.device)

    def _arriving(self, order: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """``(unit, images)`` of ``self.units[order]``, read by Ray Data a few units ahead, each unit whole and
        (on a GPU) in pinned memory so that its copy to the device does not hold up the host."""
        pieces: list[np.ndarray] = []
        for block in unit_dataset(self.units, order).iter_batches(batch_size=None, batch_format="numpy",
                                                                  prefetch_batches=STREAM_PREFETCH_UNITS):
            # a block is one unit, part of one (Ray Data splits large blocks) or, were it to merge them, several
            units = block["unit"]
            bounds = np.flatnonzero(np.diff(units)) + 1
            for start, stop in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(units)]]), strict=True):
                unit = int(units[start])
                pieces.append(block["image"][start:stop])
                if sum(len(piece) for piece in pieces) < self.unit_sizes[unit]:
                    continue  # the rest of this unit follows in the next block
                images = torch.from_numpy(np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0]))
                pieces = []
                yield unit, images.pin_memory() if self.device.type == "cuda" else images

    def _read_whole_shard(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shard's rows as stored and (N,) labels on the device, read once, units in order."""
        parts = [images for _, images in self._arriving(np.arange(len(self.units)))]
        if not parts:
            return (torch.zeros((0, *self.image_shape), dtype=torch.uint8, device=self.device),
                    torch.zeros(0, dtype=torch.long, device=self.device))
        images = torch.cat(parts)
        if self.device.type == "cuda":
            images = images.pin_memory()
        return images.to(self.device, non_blocking=True), torch.from_numpy(self.labels).to(self.device)


def _read_ahead(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """``items``, pulled by a thread from the start, ``depth`` ahead of the consumer: a streamed epoch's first row
    groups are read while the worker still evaluates the previous epoch. An error in the thread is raised here."""
    handed: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def pull() -> None:
        try:
            for item in items:
                handed.put(item)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            handed.put(err)
        handed.put(done)

    def drain() -> Iterator[Any]:
        while (item := handed.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    threading.Thread(target=pull, daemon=True, name="stream-read-ahead").start()  # now, not at the first item
    return drain()


def _free_memory(device: torch.device, context: WorkerContext) -> tuple[int, int]:
    """(free bytes, workers drawing on them) for ``--cache-budget auto``: the GPU's free memory and the workers
    sharing the GPU, or the node's available RAM and the training workers on the node."""
    if device.type == "cuda":
        share = gpu_share(context.train.gpus_per_worker) or 1.0
        return torch.cuda.mem_get_info(device)[0], max(1, round(1 / share))
    import psutil

    sharing = ray.train.get_context().get_local_world_size() * context.trainers_per_node
    return psutil.virtual_memory().available, sharing


def peak_memory_gb(device: torch.device) -> float:
    """This worker's peak memory so far, in GiB: the most the GPU's allocator held, or the process's peak resident
    set on a CPU (what a cached shard or a streamed epoch's buffer adds to shows up in either)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30, 3)  # Linux: KiB


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
