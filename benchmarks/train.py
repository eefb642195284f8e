"""The train suite: training images/s of ``jobs.train``'s path (:func:`onray.trainer.train_backbones`: Ray Data
streaming augmented batches into one Ray Train worker) against a plain PyTorch loop over the same images
held in memory as a uint8 tensor.

Same model, triplet objective, optimiser, P x K batches, augmentation (applied inline, batch by batch:
about 3 ms per 128 images at 32 px, under 1 % of a ResNet50 step), torch threads and step function
(:func:`lib.training.train_epoch`, which the Ray Train worker runs too), on the quick preset's training
subset (500 images per class). A third side runs the plain loop inside a Ray Train worker (same tensors,
no Ray Data): it separates what the worker process costs from what streaming the data beside it costs.
Each Ray-side run is compared with the plain runs just before and after it (this machine's speed
drifts); rates exclude each run's first epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BenchmarkConfig, prepared
from lib.console import log
from lib.devices import available_cpus
from lib.paths import RunPaths
from onray.runtime import init_ray

TRAIN_ROUNDS = 2  # a round of the train suite trains twice and runs the plain loop twice: about 6 minutes here


def plain_training_epochs(cfg: BenchmarkConfig, train_cfg, images, labels, epochs: int, bf16: bool) -> list[float]:
    """Images/s of each epoch of a plain PyTorch triplet training loop over in-memory (N, H, W, 3) uint8
    ``images``, augmented batch by batch as jobs.train's input pipeline does (in bf16 when ``bf16``,
    as jobs.train's CPU worker runs), each epoch one :func:`lib.training.train_epoch` on the CPU."""
    import torch

    from lib.augment import AugmentSettings, augment_batch
    from lib.backbones import build_model
    from lib.batching import balanced_batches
    from lib.losses import TripletObjective
    from lib.precision import prepare_for_bf16
    from lib.training import EPOCH_TOTALS, make_optimizer, train_epoch

    torch.manual_seed(train_cfg.seed)
    model = prepare_for_bf16(build_model(train_cfg.backbone, train_cfg.weights, train_cfg.embedding_dim), bf16)
    optimizer, scheduler = make_optimizer(model, train_cfg, max(1, len(labels) // cfg.batch_size))
    objective = TripletObjective(train_cfg.margin, train_cfg.miner)
    settings = AugmentSettings(image_size=train_cfg.image_size)
    device = torch.device("cpu")
    rates = []
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        stream = ({"image": augment_batch(images[order[i:i + cfg.batch_size]], settings),
                   "label": labels[order[i:i + cfg.batch_size]]} for i in range(0, len(order), cfg.batch_size))
        batches = balanced_batches(stream, cfg.batch_size, train_cfg.samples_per_class, seed=epoch)
        started = time.perf_counter()
        totals = train_epoch(model, batches, objective, optimizer, scheduler, device, bf16)
        rates.append(totals[EPOCH_TOTALS.index("images")] / (time.perf_counter() - started))
        log(f"train suite: plain loop epoch {epoch + 1}/{epochs}: {rates[-1]:.1f} images/s")
    return rates


def _plain_loop_in_worker(config: dict) -> list[float]:
    """Ray Train worker loop of the train suite's third side: the plain loop on the driver's tensors."""
    import ray
    import torch

    torch.set_num_threads(config["threads"])  # as jobs.train sets its CPU worker
    images, labels = ray.get(config["tensors"])
    return plain_training_epochs(config["cfg"], config["train_cfg"], images, labels, config["epochs"], config["bf16"])


def plain_loop_in_ray_train(cfg: BenchmarkConfig, train_cfg, images, labels, threads: int, bf16: bool) -> list[float]:
    """Images/s per epoch of :func:`plain_training_epochs` run by one Ray Train CPU worker (as jobs.train's)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _plain_loop_in_worker,
        train_loop_config={"cfg": cfg, "train_cfg": train_cfg, "tensors": [ray.put(images), ray.put(labels)],
                           "epochs": cfg.epochs, "threads": threads, "bf16": bf16},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="plain-loop-in-worker", storage_path=str(Path(train_cfg.run_dir).absolute())))
    return trainer.fit().return_value


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    import torch

    from lib.precision import uses_bf16
    from lib.training import TrainConfig, per_class_subset
    from onray.trainer import train_backbones

    data = prepared(cfg, work)
    per_class = max(1, cfg.train_images // len(data.classes))
    train_cfg = TrainConfig(data_dir=str(data.root), run_dir=str(work / "train-suite"), backbones=(cfg.backbone,),
                            preset="quick", epochs=cfg.epochs, batch_size=cfg.batch_size, train_per_class=per_class,
                            val_per_class=10, patience=0, num_workers=1, use_gpu="false").resolve()
    split = data.read_split("train")
    keep = set(per_class_subset(split.ids, split.labels, per_class, train_cfg.seed).tolist())
    rows = np.asarray([str(i) in keep for i in split.ids])
    images = torch.from_numpy(np.ascontiguousarray(split.images[rows]))
    labels = torch.from_numpy(split.labels[rows].astype(np.int64))
    threads = available_cpus()
    torch.set_num_threads(threads)  # what jobs.train gives its single CPU worker
    bf16 = uses_bf16(train_cfg.precision, "cpu")  # the precision jobs.train's CPU worker runs in
    precision = "bf16" if bf16 else "fp32"
    log(f"train suite: {cfg.backbone}, {len(labels)} images, batch {cfg.batch_size}, {threads} torch threads, "
        f"{precision}")
    init_ray()

    def plain_side() -> list[float]:
        return plain_training_epochs(cfg, train_cfg, images, labels, cfg.epochs, bf16)

    def ray_side(round_: int) -> list[float]:
        run_cfg = dataclasses.replace(train_cfg, run_dir=str(work / f"train-suite-{round_}"))  # a fresh run
        train_backbones(run_cfg)
        metrics = RunPaths.of(run_cfg.run_dir).model(cfg.backbone) / "metrics.jsonl"
        return [row["images_per_s"] for row in map(json.loads, metrics.read_text().splitlines()) if row["epoch"] >= 1]

    def worker_side() -> list[float]:
        log("train suite: the plain loop inside a Ray Train worker (no Ray Data) ...")
        return plain_loop_in_ray_train(cfg, train_cfg, images, labels, threads, bf16)

    # This machine's speed drifts by more than the gap being measured, so every Ray-side run is compared
    # with the plain runs just before and after it: plain, Ray, plain, worker, plain, Ray, plain, ...
    # (whole training runs, not single calls: hence not benchmarks.common.interleave)
    runs: dict[str, list[list[float]]] = {"plain": [plain_side()], "ray": [], "worker": []}
    ratios: dict[str, list[float]] = {"ray": [], "worker": []}
    for round_ in range(min(cfg.rounds, TRAIN_ROUNDS)):
        for side, measure in (("ray", functools.partial(ray_side, round_)), ("worker", worker_side)):
            runs[side].append(measure())
            runs["plain"].append(plain_side())
            around = statistics.mean(statistics.median(rates[1:]) for rates in runs["plain"][-2:])
            ratios[side].append(statistics.median(runs[side][-1][1:]) / around)

    def median_of(side: str) -> float:  # epochs after each run's warm-up epoch
        return round(statistics.median(r for rates in runs[side] for r in rates[1:]), 1)

    return {
        "backbone": cfg.backbone, "images": len(labels), "batch_size": cfg.batch_size, "torch_threads": threads,
        "precision": precision,
        **{f"{side}_images_per_s": [[round(r, 1) for r in rates] for rates in runs[side]] for side in runs},
        "plain_median": median_of("plain"), "ray_median": median_of("ray"), "worker_median": median_of("worker"),
        "ratios": [round(r, 3) for r in ratios["ray"]], "ratio": round(statistics.median(ratios["ray"]), 2),
        "worker_ratios": [round(r, 3) for r in ratios["worker"]],
        "ratio_worker_alone": round(statistics.median(ratios["worker"]), 2),
    }


def summary(r: dict) -> str:
    return (f"{r['backbone']} {r['ray_median']} images/s through Ray Data + Ray Train vs plain PyTorch "
            f"loop on in-memory tensors {r['plain_median']} images/s ({r['torch_threads']} threads, "
            f"{r['precision']}) -> {r['ratio']}x (rounds {r['ratios']}); the plain loop inside a Ray "
            f"Train worker {r['worker_median']} images/s -> {r['ratio_worker_alone']}x")
