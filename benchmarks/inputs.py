"""The inputs suite: augmented batches/s from the Ray Data pipeline (:func:`onray.data.augmented_dataset`)
against the plain PyTorch DataLoader (:func:`lib.loader.torch_loader`), same transform, batch size and CPU count.

Both apply :func:`lib.augment.augment_batch`, so the ratio measures the plumbing, not the maths. One
warm-up epoch per side, then ``--rounds`` interleaved epochs each; the medians give the ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from pathlib import Path

from benchmarks.common import BenchmarkConfig, interleave, prepared
from lib.console import log
from onray.runtime import init_ray


def _rate(batches: Iterable) -> float:
    started, count = time.perf_counter(), 0
    for _ in batches:
        count += 1
    return count / (time.perf_counter() - started)


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    from lib.augment import AugmentSettings
    from lib.loader import torch_loader
    from onray.data import augmented_dataset

    data = prepared(cfg, work)
    settings = AugmentSettings(image_size=cfg.image_size)
    init_ray()
    loader = torch_loader(data.root, batch_size=cfg.batch_size, settings=settings)
    dataset = augmented_dataset(data, settings=settings)
    log(f"inputs suite: {cfg.rounds} interleaved epochs per side, batch {cfg.batch_size} ...")
    rates = interleave({
        "torch_dataloader": lambda: _rate(loader),
        "ray_data": lambda: _rate(dataset.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True)),
    }, cfg.rounds, warmup=True).values
    torch_rate = statistics.median(rates["torch_dataloader"])
    ray_rate = statistics.median(rates["ray_data"])
    return {
        "batch_size": cfg.batch_size, "image_size": cfg.image_size, "dataloader_workers": loader.num_workers,
        "torch_batches_per_s": [round(r, 1) for r in rates["torch_dataloader"]],
        "ray_batches_per_s": [round(r, 1) for r in rates["ray_data"]],
        "torch_median": round(torch_rate, 1), "ray_median": round(ray_rate, 1),
        "ratio": round(ray_rate / torch_rate, 2),
    }


def summary(r: dict) -> str:
    return (f"Ray Data {r['ray_median']} batches/s vs PyTorch DataLoader {r['torch_median']} "
            f"batches/s ({r['dataloader_workers']} workers) -> {r['ratio']}x")
