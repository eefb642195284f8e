"""The Ray Train worker loop of one backbone's triplet fine-tuning (runs on every DDP worker).

Each epoch: class-balanced P x K batches of the train shard (:func:`lib.training.train_epoch`), then val loss
and val mAP@5 over the whole val split, then a report to Ray Train with rank 0's checkpoint. A restarted worker
group resumes from the last checkpoint.

With ``augment_on="device"`` (the default) the shard carries the stored images: the worker gathers its
rows onto its device once, then each epoch picks P x K batches of them by index and augments (and resizes)
them there; the val split is resized there once. With ``"data"`` Ray Data's map tasks augment on CPUs and the worker
re-batches the stream. Per-step statistics stay on the device and are read once per epoch.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from lib.augment import AugmentSettings, fresh_generator, normalize, resize_batch
from lib.backbones import build_model
from lib.batching import balanced_batches, epoch_batches, planned_steps
from lib.checkpoints import load_train_state
from lib.config import from_dict
from lib.console import log
from lib.devices import available_cpus, cuda_unusable_reason
from lib.losses import COLLAPSE_SPREAD, TripletObjective
from lib.paths import RunPaths
from lib.precision import forward, prepare_for_bf16, uses_bf16
from lib.training import (
    METRIC,
    TrainConfig,
    augmented_batches,
    best_epoch,
    make_optimizer,
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
            if flag.item() == 0:
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor], objective: TripletObjective,
             device: torch.device, bf16: bool) -> dict[str, float]:
    """Val loss and val retrieval metrics over the whole val split (every rank's part gathered); ``val`` is this
    rank's (N, 3, S, S) uint8 images and (N,) labels on ``device``."""
    model.eval()
    images, labels = val
    embeddings, loss_sum, batches = [], torch.zeros((), device=device), 0
    for start in range(0, len(labels), 256):
        embedding = forward(model, normalize(images[start:start + 256]), bf16)
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
    return {"val_loss": loss_sum / max(1, batches), **val_retrieval_metrics(all_embeddings, all_labels)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(TrainConfig, config["train"], source="train_loop_config")  # a typo fails here, at once
    rank, world = _world()
    if ray.get_gpu_ids() and not torch.cuda.is_available():
        raise RuntimeError(cuda_unusable_reason())  # never a silent CPU fallback on a GPU worker
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: let cuDNN pick its fastest kernels
    else:
        # Ray pins a CPU worker to one thread; give each worker its share of the node's cores
        # (shared with the other backbones' workers when several train on one machine).
        sharing = ray.train.get_context().get_local_world_size() * config.get("trainers_per_node", 1)
        torch.set_num_threads(max(1, available_cpus() // sharing))
    torch.manual_seed(cfg.seed)
    bf16 = uses_bf16(cfg.precision, device)
    model = prepare_for_bf16(build_model(cfg.backbone, cfg.weights, cfg.embedding_dim), bf16)
    model = ray.train.torch.prepare_model(model)
    plain_model = model.module if hasattr(model, "module") else model
    samples_per_class = max(cfg.samples_per_class, -(-cfg.batch_size // config["num_classes"]))
    # the batches the loader really yields (P x K rows each, not --batch-size): the LR schedule counts these
    steps_per_epoch = max(1, planned_steps(config["rows_per_worker"], config["num_classes"], cfg.batch_size,
                                           samples_per_class))
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch)
    objective = TripletObjective(cfg.margin, cfg.miner)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    on_device = cfg.augment_on == "device"
    settings = AugmentSettings(image_size=cfg.image_size)
    val = whole_shard(val_shard, device)  # read once; resized once, here, when the worker augments
    val = (resize_batch(val[0], cfg.image_size) if on_device and len(val[1]) else val[0], val[1])
    train_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    history: list[dict[str, Any]] = []
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:  # weights_only loading: a checkpoint never runs code
            model_state, state = load_train_state(folder, device, run_folder=Path(checkpoint.path).parent)
        plain_model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        resumed_from = history[-1]["epoch"]
        if rank == 0:
            log(f"{cfg.backbone}: resuming after epoch {history[-1]['epoch']} from {checkpoint.path}")
    else:
        history.append({"epoch": 0, **evaluate(plain_model, val, objective, device, bf16)})
        if rank == 0:
            log(f"{cfg.backbone}: untrained val mAP@5 {history[0][METRIC]:.3f}, P@5 {history[0]['val_p@5']:.3f}")

    # rank 0's position goes to the driver's progress bars when it gave a board (jobs.train); else a line now and then
    reporter = StepReporter(config.get("progress") if rank == 0 else None, cfg.backbone, cfg.epochs, steps_per_epoch,
                            cfg.batch_size * world)
    for epoch in range(history[-1]["epoch"] + 1, cfg.epochs + 1):
        _maybe_inject_failure(cfg, epoch, rank)
        started = last_log = time.perf_counter()
        reporter.step(epoch, 0, force=True)

        def progress(step: int, totals: torch.Tensor, epoch: int = epoch) -> None:
            nonlocal last_log
            reporter.step(epoch, step)
            if rank == 0 and reporter.board is None and time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                log(f"{cfg.backbone} epoch {epoch}: step {step}/~{steps_per_epoch}, loss {totals[0] / totals[1]:.4f}")

        seed = cfg.seed * 1000 + epoch * 10 + rank
        if on_device:
            # this worker's rows as stored, gathered from Ray Data once: every epoch draws new P x K batches and new
            # views of them here, with no Ray Data step inside an epoch
            stored, stored_labels = train_rows = train_rows or whole_shard(train_shard, device)
            index = epoch_batches(stored_labels, cfg.batch_size, samples_per_class, seed=seed)
            steps = _fewest_across_ranks(min(len(index), steps_per_epoch), device)  # DDP: equal step counts
            batches = augmented_batches(stored, stored_labels, index[:steps], settings, fresh_generator(seed, device))
        else:
            stream = train_shard.iter_torch_batches(batch_size=cfg.batch_size, device="cpu", prefetch_batches=2,
                                                    local_shuffle_buffer_size=4 * cfg.batch_size)
            batches = _all_have_batches(balanced_batches(stream, cfg.batch_size, samples_per_class, seed=seed,
                                                         max_steps=steps_per_epoch), device)
        totals = train_epoch(model, batches, objective, optimizer, scheduler, device, bf16, on_step=progress)
        seconds = time.perf_counter() - started
        reporter.step(epoch, steps_per_epoch, force=True)
        loss_sum, steps, images, active, valid, spread = _sum_across_ranks(totals.tolist(), device)
        if steps == 0:
            raise RuntimeError(f"epoch {epoch} had no class-balanced batch of {cfg.batch_size} "
                               f"({samples_per_class} per class): lower --batch-size or use more data")
        row = {"epoch": epoch, "train_loss": loss_sum / max(1, steps), "active_fraction": active / max(1, valid),
               "spread": spread / max(1, steps), "lr": scheduler.get_last_lr()[0], "steps": int(steps / world),
               "images_per_s": images / seconds, "epoch_seconds": seconds,
               **evaluate(plain_model, val, objective, device, bf16)}
        if device.type == "cuda":
            row["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        if resumed_from is not None:  # the first epoch after a restart or a rerun says so in the metrics
            row["resumed_from"], resumed_from = resumed_from, None
        history.append(row)
        best = best_epoch(history)
        stop = bool(cfg.patience) and epoch - best["epoch"] >= cfg.patience
        collapsed = row["spread"] < COLLAPSE_SPREAD  # every image mapped to (nearly) one point
        if rank == 0:
            log(f"{cfg.backbone} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} (val {row['val_loss']:.4f}), "
                f"val mAP@5 {row[METRIC]:.3f} P@5 {row['val_p@5']:.3f}, active triplets {row['active_fraction']:.3f}, "
                f"spread {row['spread']:.3f}, {row['images_per_s']:.0f} img/s"
                + (" - embeddings collapsed: lower --lr or change --miner" if collapsed else "")
                + (f" - early stop: no better val mAP@5 for {cfg.patience} epochs" if stop else ""))
        _report(row, plain_model, optimizer, scheduler, history, rank)
        if stop:
            break


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


def _report(row, model, optimizer, scheduler, history, rank) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), Path(folder) / "model.pt")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history},
                   Path(folder) / "train_state.pt")
        (Path(folder) / "history.json").write_text(json.dumps(history, indent=1))
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder))
