"""Benchmarks: the project's Ray paths against plain single-process / plain PyTorch baselines.

    python -m jobs.benchmark --suites prepare,inputs [--source imagefolder:PATH] [--work-dir DIR]

Every ratio compares two measurements taken in this one run on this one machine, so a noisy
machine moves both. Suites interleave baseline and candidate rounds and report medians.

- ``prepare``: ``python -m jobs.prepare`` in a fresh process (Ray start included) against a plain
  single-process PIL decode loop over the same files.
- ``inputs``: augmented batches/s from the Ray Data pipeline (jobs.inputs) against the plain
  PyTorch DataLoader (lib.loader), same transform, batch size and CPU count.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.runtime import init_ray, log, run_job
from lib.config import option
from lib.dataset import complete_manifest
from lib.errors import UserError
from lib.io import ensure_writable_dir, write_json
from lib.sources import list_image_folder, parse_source

DEFAULT_SOURCE = "imagefolder:" + os.environ.get(
    "CIFAR10_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"))


@dataclass(frozen=True)
class BenchmarkConfig:
    """Measure the Ray paths against plain baselines in one run and print the ratios."""

    suites: tuple[str, ...] = option(("prepare", "inputs"), help="which suites to run: prepare, inputs")
    source: str = option(DEFAULT_SOURCE, help="image source to benchmark on (an imagefolder for 'prepare')")
    work_dir: str = option("", help="where to prepare data (default: a temporary folder, removed after)")
    rounds: int = option(5, help="measured rounds per side (after one warm-up round each)")
    batch_size: int = option(128, help="batch size of the input-pipeline suite")
    image_size: int | None = option(None, help="output side of the augmentation (default: stored size)")
    output: str = option("", help="also write the results as JSON to this file")

    def __post_init__(self) -> None:
        unknown = set(self.suites) - set(SUITES)
        if unknown:
            raise UserError(f"unknown benchmark suite(s) {', '.join(sorted(unknown))} "
                            f"(choose from {', '.join(SUITES)})")
        if self.rounds < 1:
            raise UserError(f"--rounds must be at least 1, got {self.rounds}")


def plain_pil_decode(paths: list[str]) -> float:
    """Seconds for one process to decode ``paths`` to RGB arrays with PIL (the baseline loop)."""
    from PIL import Image

    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB"))
    return time.perf_counter() - started


def prepare_suite(cfg: BenchmarkConfig, work: Path) -> dict:
    source = parse_source(cfg.source)
    if source.kind != "imagefolder":
        raise UserError("the prepare suite needs --source imagefolder:PATH")
    listing = list_image_folder(source.path)
    n = len(listing)
    log(f"prepare suite: {n} images; plain PIL loop ...")
    pil_seconds = plain_pil_decode(listing.paths)
    data_dir = Path(tempfile.mkdtemp(dir=work, prefix="prepare-fresh-"))  # never a prepared DATA
    log("prepare suite: python -m jobs.prepare in a fresh process (Ray start included) ...")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--source", cfg.source, "--data-dir", str(data_dir)],
                   check=True, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    wall = time.perf_counter() - started
    manifest = complete_manifest(data_dir)
    if manifest is None:
        raise RuntimeError("jobs.prepare finished without a complete manifest")
    decode = manifest["timing"]["decode_write_seconds"]
    return {
        "images": n,
        "plain_pil_seconds": round(pil_seconds, 2), "plain_pil_images_per_s": round(n / pil_seconds),
        "prepare_wall_seconds": round(wall, 2), "prepare_images_per_s_wall": round(n / wall),
        "prepare_decode_write_seconds": decode, "prepare_images_per_s_decode_write": round(n / decode),
        "ratio_wall": round(pil_seconds / wall, 2), "ratio_decode_write": round(pil_seconds / decode, 2),
    }


def _rate(batches: Iterable) -> float:
    started, count = time.perf_counter(), 0
    for _ in batches:
        count += 1
    return count / (time.perf_counter() - started)


def interleave(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each side once to warm up, then alternate them ``rounds`` times; returns every measurement."""
    for measure in sides.values():
        measure()
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            results[name].append(measure())
    return results


def inputs_suite(cfg: BenchmarkConfig, work: Path) -> dict:
    from jobs.inputs import augmented_dataset
    from lib.augment import AugmentSettings
    from lib.loader import torch_loader

    data_dir = _prepared(cfg, work)
    settings = AugmentSettings(image_size=cfg.image_size)
    init_ray()
    loader = torch_loader(data_dir, batch_size=cfg.batch_size, settings=settings)
    dataset = augmented_dataset(data_dir, settings=settings)
    log(f"inputs suite: {cfg.rounds} interleaved epochs per side, batch {cfg.batch_size} ...")
    rates = interleave({
        "torch_dataloader": lambda: _rate(loader),
        "ray_data": lambda: _rate(dataset.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True)),
    }, cfg.rounds)
    torch_rate = statistics.median(rates["torch_dataloader"])
    ray_rate = statistics.median(rates["ray_data"])
    return {
        "batch_size": cfg.batch_size, "image_size": cfg.image_size, "dataloader_workers": loader.num_workers,
        "torch_batches_per_s": [round(r, 1) for r in rates["torch_dataloader"]],
        "ray_batches_per_s": [round(r, 1) for r in rates["ray_data"]],
        "torch_median": round(torch_rate, 1), "ray_median": round(ray_rate, 1),
        "ratio": round(ray_rate / torch_rate, 2),
    }


def _prepared(cfg: BenchmarkConfig, work: Path) -> Path:
    """A prepared DATA for ``cfg.source`` in ``work``, prepared on first use."""
    data_dir = work / "prepared"
    if complete_manifest(data_dir) is None:
        from jobs import prepare

        prepare.main(prepare.PrepareConfig(source=cfg.source, data_dir=str(data_dir)))
    return data_dir


SUITES: dict[str, Callable[[BenchmarkConfig, Path], dict]] = {"prepare": prepare_suite, "inputs": inputs_suite}


def main(cfg: BenchmarkConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="cifar-bench-") as tmp:
        work = ensure_writable_dir(cfg.work_dir) if cfg.work_dir else Path(tmp)
        results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
        for name in cfg.suites:
            results[name] = SUITES[name](cfg, work)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    if "prepare" in results:
        r = results["prepare"]
        print(f"prepare: {r['images']} images in {r['prepare_wall_seconds']} s wall (Ray start included); "
              f"{r['prepare_images_per_s_wall']:,}/s wall and {r['prepare_images_per_s_decode_write']:,}/s "
              f"decode+write vs plain PIL loop {r['plain_pil_images_per_s']:,}/s -> "
              f"{r['ratio_wall']}x wall, {r['ratio_decode_write']}x decode+write")
    if "inputs" in results:
        r = results["inputs"]
        print(f"inputs: Ray Data {r['ray_median']} batches/s vs PyTorch DataLoader {r['torch_median']} "
              f"batches/s ({r['dataloader_workers']} workers) -> {r['ratio']}x")
    if cfg.output:
        write_json(cfg.output, results)
    return results


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, BenchmarkConfig, argv, prog="jobs.benchmark")


if __name__ == "__main__":
    sys.exit(cli())
