"""One backbone's triplet fine-tuning as a Ray Train ``TorchTrainer`` (Train V2).

``fit_backbone(cfg)`` builds the Ray Datasets (augmented train split, resized val split), runs
``train_loop_per_worker`` on ``cfg.num_workers`` DDP workers and writes the outputs under
``RUN/models/<backbone>/``: ``model.pt`` (best epoch by val mAP@5), ``metrics.jsonl``,
``loss_curve.png``, ``config.json`` and, last, ``summary.json`` (its presence marks a finished run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.inputs import augmented_dataset
from jobs.runtime import log
from lib.augment import AugmentSettings, normalize
from lib.backbones import build_model
from lib.batching import balanced_batches
from lib.config import from_dict, to_dict
from lib.dataset import split_files, table_ids
from lib.errors import UserError
from lib.io import write_json
from lib.losses import COLLAPSE_SPREAD, TripletObjective
from lib.precision import forward, prepare_for_bf16, uses_bf16
from lib.training import (
    METRIC,
    TrainConfig,
    best_epoch,
    make_optimizer,
    per_class_subset,
    val_retrieval_metrics,
)

PROGRESS_EVERY_S = 30.0


# --------------------------------------------------------------------------- on the workers


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
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # Ray pins a CPU worker to one thread; give each worker its share of the node's cores
        # (shared with the other backbones' workers when several train on one machine).
        sharing = ray.train.get_context().get_local_world_size() * config.get("trainers_per_node", 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // sharing))
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
        with checkpoint.as_directory() as folder:
            plain_model.load_state_dict(torch.load(Path(folder) / "model.pt", map_location=device, weights_only=True))
            state = torch.load(Path(folder) / "train_state.pt", map_location="cpu", weights_only=False)
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

    for epoch in range(history[-1]["epoch"] + 1, cfg.epochs + 1):
        _maybe_inject_failure(cfg, epoch, rank)
        model.train()
        started = last_log = time.perf_counter()
        totals = np.zeros(6)  # loss sum, steps, images, active, valid, spread sum
        stream = train_shard.iter_torch_batches(batch_size=cfg.batch_size, local_shuffle_buffer_size=4 * cfg.batch_size,
                                                prefetch_batches=2)
        batches = balanced_batches(stream, cfg.batch_size, samples_per_class, seed=cfg.seed * 1000 + epoch * 10 + rank)
        for step, batch in enumerate(_all_have_batches(batches, device), start=1):
            images = normalize(batch["image"].to(device, non_blocking=True))
            loss, stats = objective(forward(model, images, bf16), batch["label"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            totals += [loss.item(), 1, len(images), stats.active, stats.valid, stats.spread]
            if rank == 0 and time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                log(f"{cfg.backbone} epoch {epoch}: step {step}/~{steps_per_epoch}, loss {totals[0] / totals[1]:.4f}")
        seconds = time.perf_counter() - started
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
    marker = Path(cfg.run_dir) / "models" / cfg.backbone / f".failure-injected-at-{epoch}"
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


# --------------------------------------------------------------------------- in the driver


def model_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir).absolute() / "models" / cfg.backbone


# Settings that do not change what a training run computes: a rerun that differs only in them is the same run.
NOT_RESULT_KEYS = ("max_failures", "inject_failure", "storage")


def _result_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_RESULT_KEYS}


def finished(cfg: TrainConfig) -> bool:
    """True when ``summary.json`` says this backbone was trained with exactly this resolved config."""
    try:
        summary = json.loads((model_dir(cfg) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (_result_settings(to_dict(cfg)) == _result_settings(summary.get("config", {}))
            and (model_dir(cfg) / "model.pt").is_file())


def train_run_name(cfg: TrainConfig) -> str:
    """Ray Train's run name for ``cfg``: ``<backbone>-<digest of the resolved config>``. An interrupted run
    resumes from its checkpoints only when rerun with the same config; a changed one starts afresh."""
    settings = json.dumps(_result_settings(to_dict(cfg)), sort_keys=True, default=str)
    return f"{cfg.backbone}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"


def _ids_and_labels(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.ParquetDataset(split_files(data_dir, split)).read(columns=["id", "label"])
    return table_ids(table), table.column("label").to_numpy()


def fit_backbone(cfg: TrainConfig, use_gpu: bool, num_classes: int, trainers_per_node: int = 1) -> dict[str, Any]:
    """Train ``cfg.backbone`` (resuming a run in the same storage) and write its outputs; returns the summary.

    ``trainers_per_node``: how many trainers share each machine's cores (CPU workers split them).
    """
    out = model_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # an earlier config's outputs are stale from here on
    trainer = build_trainer(cfg, use_gpu, num_classes, trainers_per_node,
                            name=train_run_name(cfg), storage=cfg.storage or str(out))
    started = time.perf_counter()
    result = trainer.fit()
    return write_outputs(cfg, result, time.perf_counter() - started)


def build_trainer(cfg: TrainConfig, use_gpu: bool, num_classes: int, trainers_per_node: int = 1, *,
                  name: str, storage: str, callbacks: list | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of one training run of ``cfg`` (used by ``fit_backbone`` and each Tune trial).

    Builds the Ray Datasets (augmented train subset, resized val subset); the run keeps its checkpoints
    under ``storage/name``, so a second trainer with the same name and storage resumes from them.
    ``callbacks`` are Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).
    """
    # The job logs its own per-epoch progress; per-epoch dataset bars would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    settings = AugmentSettings(image_size=cfg.image_size)
    datasets = {}
    rows = 0
    for split, per_class, augment in (("train", cfg.train_per_class, True), ("val", cfg.val_per_class, False)):
        ids, labels = _ids_and_labels(cfg.data_dir, split)
        keep = per_class_subset(ids, labels, per_class, cfg.seed) if per_class else None
        rows = rows or (len(keep) if keep is not None else len(ids))
        if split == "train" and rows // cfg.num_workers < cfg.batch_size:
            raise UserError(f"{rows} train images give each of {cfg.num_workers} workers fewer than "
                            f"--batch-size {cfg.batch_size}: lower --batch-size or --num-workers")
        datasets[split] = augmented_dataset(cfg.data_dir, split, settings, augment=augment, keep_ids=keep,
                                            shuffle="blocks" if augment else "none")
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "rows_per_worker": rows // cfg.num_workers,
                           "num_classes": num_classes, "trainers_per_node": trainers_per_node},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                               checkpoint_score_order="max")),
        datasets=datasets,
    )


def write_outputs(cfg: TrainConfig, result, seconds: float) -> dict[str, Any]:
    """From a finished Ray Train result: best model, per-epoch metrics, curve PNG, config, summary (last)."""
    from lib.plots import loss_curve_figure, save_figure

    out = model_dir(cfg)
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / "history.json").read_text())
    best_row = best_epoch(history)
    best_checkpoint = max(result.best_checkpoints, key=lambda pair: pair[1].get(METRIC, -1.0))[0]
    with best_checkpoint.as_directory() as folder:
        tmp = out / ".model.pt.tmp"
        shutil.copyfile(Path(folder) / "model.pt", tmp)
        os.replace(tmp, out / "model.pt")
    with open(out / ".metrics.jsonl.tmp", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in history)
    os.replace(out / ".metrics.jsonl.tmp", out / "metrics.jsonl")
    save_figure(loss_curve_figure(history, title=f"{cfg.backbone} ({cfg.preset}, weights {cfg.weights})"),
                out / "loss_curve.png")
    write_json(out / "config.json", to_dict(cfg))
    summary = {"backbone": cfg.backbone, "epochs_run": history[-1]["epoch"], "best_epoch": best_row["epoch"],
               "untrained": {k: history[0][k] for k in (METRIC, "val_p@5", "val_loss")},
               "best": {k: best_row[k] for k in (METRIC, "val_p@5", "val_loss", "train_loss")},
               "train_seconds": round(seconds, 1), "checkpoint": best_checkpoint.path, "config": to_dict(cfg)}
    write_json(out / "summary.json", summary)
    log(f"{cfg.backbone}: best val mAP@5 {best_row[METRIC]:.3f} at epoch {best_row['epoch']} "
        f"(untrained {history[0][METRIC]:.3f}) -> {out}")
    return summary
