"""The Ray Train worker loop of one backbone's triplet fine-tuning (runs on every DDP worker).

Each epoch: class-balanced P x K batches from the streamed, augmented train shard
(:func:`lib.training.train_epoch`), then val loss and val mAP@5 over the whole val split, then a report
to Ray Train with rank 0's checkpoint. A restarted worker group resumes from the last checkpoint.
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

from lib.augment import normalize
from lib.backbones import build_model
from lib.batching import balanced_batches
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, shard, objective: TripletObjective, device: torch.device,
             bf16: bool) -> dict[str, float]:
    """Val loss and val retrieval metrics over the whole val split (every rank's shard gathered)."""
    model.eval()
    embeddings, labels, loss_sum, batches = [], [], 0.0, 0
    for batch in shard.iter_torch_batches(batch_size=256):
        images = normalize(batch["image"].to(device, non_blocking=True))
        embedding = forward(model, images, bf16)
        loss, _ = objective(embedding, batch["label"].to(device))
        loss_sum, batches = loss_sum + loss.item(), batches + 1
        embeddings.append(embedding.cpu().numpy())
        labels.append(batch["label"].numpy())
    local = (np.concatenate(embeddings) if embeddings else np.zeros((0, 1), np.float32),
             np.concatenate(labels) if labels else np.zeros(0, np.int64))
    gathered = [local]
    if _world()[1] > 1:
        gathered = [None] * _world()[1]
        dist.all_gather_object(gathered, local)
    all_embeddings = np.concatenate([g[0] for g in gathered if len(g[1])])
    all_labels = np.concatenate([g[1] for g in gathered])
    loss_sum, batches = _sum_across_ranks([loss_sum, batches], device)
    return {"val_loss": loss_sum / max(1, batches), **val_retrieval_metrics(all_embeddings, all_labels)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(TrainConfig, config["train"], source="train_loop_config")  # a typo fails here, at once
    rank, world = _world()
    if ray.get_gpu_ids() and not torch.cuda.is_available():
        raise RuntimeError(cuda_unusable_reason())  # never a silent CPU fallback on a GPU worker
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        # Ray pins a CPU worker to one thread; give each worker its share of the node's cores
        # (shared with the other backbones' workers when several train on one machine).
        sharing = ray.train.get_context().get_local_world_size() * config.get("trainers_per_node", 1)
        torch.set_num_threads(max(1, available_cpus() // sharing))
    torch.manual_seed(cfg.seed)
    bf16 = uses_bf16(cfg.precision, device)
    model = prepare_for_bf16(build_model(cfg.backbone, cfg.weights, cfg.embedding_dim), bf16)
    model = ray.train.torch.prepare_model(model)
    plain_model = model.module if hasattr(model, "module") else model
    steps_per_epoch = max(1, config["rows_per_worker"] // cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch)
    objective = TripletObjective(cfg.margin, cfg.miner)
    samples_per_class = max(cfg.samples_per_class, -(-cfg.batch_size // config["num_classes"]))
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

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
        history.append({"epoch": 0, **evaluate(plain_model, val_shard, objective, device, bf16)})
        if rank == 0:
            log(f"{cfg.backbone}: untrained val mAP@5 {history[0][METRIC]:.3f}, P@5 {history[0]['val_p@5']:.3f}")

    # rank 0's position goes to the driver's progress bars when it gave a board (jobs.train); else a line now and then
    reporter = StepReporter(config.get("progress") if rank == 0 else None, cfg.backbone, cfg.epochs, steps_per_epoch,
                            cfg.batch_size * world)
    for epoch in range(history[-1]["epoch"] + 1, cfg.epochs + 1):
        _maybe_inject_failure(cfg, epoch, rank)
        started = last_log = time.perf_counter()
        reporter.step(epoch, 0, force=True)

        def progress(step: int, totals: np.ndarray, epoch: int = epoch) -> None:
            nonlocal last_log
            reporter.step(epoch, step)
            if rank == 0 and reporter.board is None and time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                log(f"{cfg.backbone} epoch {epoch}: step {step}/~{steps_per_epoch}, loss {totals[0] / totals[1]:.4f}")

        stream = train_shard.iter_torch_batches(batch_size=cfg.batch_size, local_shuffle_buffer_size=4 * cfg.batch_size,
                                                prefetch_batches=2)
        batches = balanced_batches(stream, cfg.batch_size, samples_per_class, seed=cfg.seed * 1000 + epoch * 10 + rank)
        totals = train_epoch(model, _all_have_batches(batches, device), objective, optimizer, scheduler, device, bf16,
                             on_step=progress)
        seconds = time.perf_counter() - started
        reporter.step(epoch, steps_per_epoch, force=True)
        loss_sum, steps, images, active, valid, spread = _sum_across_ranks(totals.tolist(), device)
        if steps == 0:
            raise RuntimeError(f"epoch {epoch} had no class-balanced batch of {cfg.batch_size} "
                               f"({samples_per_class} per class): lower --batch-size or use more data")
        row = {"epoch": epoch, "train_loss": loss_sum / max(1, steps), "active_fraction": active / max(1, valid),
               "spread": spread / max(1, steps), "lr": scheduler.get_last_lr()[0], "steps": int(steps / world),
               "images_per_s": images / seconds, "epoch_seconds": seconds,
               **evaluate(plain_model, val_shard, objective, device, bf16)}
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
