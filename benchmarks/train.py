"""The train suite: training images/s of ``jobs.train``'s path (:func:`onray.trainer.train_backbones`: Ray Data
feeding one Ray Train worker) against a plain PyTorch loop over the same images held in memory.

Same setup (:func:`lib.training.build_training`: model, objective, optimiser, precision), P x K batches, device and
step function (:func:`lib.training.train_epoch`) as the Ray Train worker, on a class-balanced training subset (the
quick preset's 500 images per class by default). The plain loop is the worker's default path without
Ray: the stored uint8 images sit on the training device, P x K batches are chosen by index
(:func:`lib.batching.epoch_batches`) and augmented there (:func:`lib.training.augmented_batches`).

The Ray sides (``--train-sides``): ``ray`` is jobs.train as it runs by default (``--augment-on device``, the
shard within its cache budget: read once onto the device), ``ray_stream`` the same with ``--cache-budget 0`` (the
shard streamed from Ray Data every epoch into a buffer of the row groups due: the same batches),
``ray_data`` is jobs.train with ``--augment-on data`` (Ray Data map tasks augment on CPUs), ``worker`` the plain
loop inside a Ray Train worker (no Ray Data: what the worker process alone costs). Streaming against caching is
the ratio of their ratios to the plain runs beside them; each Ray run's peak worker memory comes from its
metrics (resident set on CPUs, the allocator's peak on GPUs). On a GPU the suite runs on it and samples
the GPU's utilisation (pynvml, else ``nvidia-smi``) while each side trains. This machine's speed drifts, so each
Ray-side run is compared with the plain runs just before and after it; rates exclude each run's first epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BenchmarkConfig, prepared
from lib.console import log
from lib.devices import available_cpus
from lib.paths import RunPaths
from onray.runtime import init_ray

TRAIN_ROUNDS = 2  # a round trains through Ray three times and runs the plain loop three times: ~9 minutes on 2 cores
RAY_SIDES = ("ray", "ray_stream", "ray_data", "worker")


def plain_training_epochs(cfg: BenchmarkConfig, train_cfg, images, labels, epochs: int,
                          device: str = "cpu") -> list[float]:
    """Images/s of each epoch of a plain PyTorch training loop over in-memory (N, H, W, 3) uint8 ``images`` on
    ``device``: the worker's own setup (:func:`lib.training.build_training`: model, objective, optimiser,
    precision), P x K batches by index, augmented on the device (what jobs.train's worker does by default), each
    epoch one :func:`lib.training.train_epoch` (in the precision ``train_cfg`` resolves to on ``device``)."""
    import torch

    from lib.augment import AugmentSettings, fresh_generator
    from lib.batching import epoch_batches
    from lib.training import augmented_batches, build_training, train_epoch

    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the worker sets it
    training = build_training(train_cfg, int(labels.max()) + 1, len(labels), device)
    settings = AugmentSettings(image_size=train_cfg.image_size)
    on_device_images, on_device_labels = images.to(device), labels.to(device)
    rates = []
    for epoch in range(epochs):
        started = time.perf_counter()
        index = epoch_batches(labels, cfg.batch_size, training.samples_per_class, seed=epoch)
        batches = augmented_batches(on_device_images, on_device_labels, index[:training.steps_per_epoch], settings,
                                    fresh_generator(epoch, device))
        totals = train_epoch(training.model_step, batches, training.objective_step, training.optimizer,
                             training.scheduler, device, training.bf16)  # reads once at the end: synced
        rates.append(totals["images"] / (time.perf_counter() - started))
        log(f"train suite: plain loop epoch {epoch + 1}/{epochs}: {rates[-1]:.1f} images/s")
    return rates


def _plain_loop_in_worker(config: dict) -> list[float]:
    """Ray Train worker loop of the train suite's ``worker`` side: the plain loop on the driver's tensors."""
    import ray
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(config["threads"])  # as jobs.train sets its CPU worker
    images, labels = ray.get(config["tensors"])
    return plain_training_epochs(config["cfg"], config["train_cfg"], images, labels, config["epochs"], str(device))


def plain_loop_in_ray_train(cfg: BenchmarkConfig, train_cfg, images, labels, threads: int,
                            use_gpu: bool) -> list[float]:
    """Images/s per epoch of :func:`plain_training_epochs` run by one Ray Train worker (as jobs.train's)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _plain_loop_in_worker,
        train_loop_config={"cfg": cfg, "train_cfg": train_cfg, "tensors": [ray.put(images), ray.put(labels)],
                           "epochs": cfg.epochs, "threads": threads},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name="plain-loop-in-worker", storage_path=str(Path(train_cfg.run_dir).absolute())))
    return trainer.fit().return_value


class GpuUtilisation:
    """Samples the GPUs' utilisation (%) every ``every_s`` in a thread while in a ``with`` block: pynvml when it is
    installed, else ``nvidia-smi``; ``samples`` stays empty where neither works (no GPU)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.samples = every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            return lambda: [float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in handles]
        except Exception:  # noqa: BLE001 - no pynvml or no driver: try nvidia-smi
            pass
        if shutil.which("nvidia-smi") is None:
            return None

        def smi() -> list[float]:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return [float(line) for line in out.split()]
        try:
            smi()
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        return smi

    def _sample(self) -> None:
        read = self.reader()
        while read is not None and not self._stop.wait(self.every_s):
            try:
                self.samples.append(statistics.mean(read()))
            except Exception:  # noqa: BLE001 - a failed read ends sampling, never the benchmark
                return

    def __enter__(self) -> GpuUtilisation:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    import torch

    from lib.data.subsets import per_class_subset
    from lib.precision import uses_bf16
    from lib.training import TrainConfig
    from onray.trainer import train_backbones

    data = prepared(cfg, work)
    per_class = max(1, cfg.train_images // len(data.classes))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_cfg = TrainConfig(data_dir=str(data.root), run_dir=str(work / "train-suite"), backbones=(cfg.backbone,),
                            preset="quick", epochs=cfg.epochs, batch_size=cfg.batch_size, train_per_class=per_class,
                            val_per_class=10, patience=0, num_workers=1, image_size=cfg.image_size,
                            use_gpu="true" if device == "cuda" else "false").resolve()
    split = data.read_split("train")
    keep = set(per_class_subset(split.ids, split.labels, per_class, train_cfg.seed).tolist())
    rows = np.asarray([str(i) in keep for i in split.ids])
    images = torch.from_numpy(np.ascontiguousarray(split.images[rows]))
    labels = torch.from_numpy(split.labels[rows].astype(np.int64))
    threads = available_cpus()
    torch.set_num_threads(threads)  # what jobs.train gives its single CPU worker
    bf16 = uses_bf16(train_cfg.precision, device)  # the precision jobs.train's worker runs in
    precision = "bf16" if bf16 else "fp32"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    log(f"train suite: {cfg.backbone}, {len(labels)} images at {train_cfg.image_size} px, batch {cfg.batch_size}, "
        f"{gpu or f'CPU, {threads} torch threads'}, {precision}")
    init_ray()
    utilisation: dict[str, list[float]] = {side: [] for side in ("plain", *RAY_SIDES)}
    peak_gb: list[float] = []

    def sampled(side: str, measure):
        with GpuUtilisation() as sampler:
            value = measure()
        if sampler.mean is not None:
            utilisation[side].append(sampler.mean)
        return value

    def plain_side() -> list[float]:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rates = sampled("plain", lambda: plain_training_epochs(cfg, train_cfg, images, labels, cfg.epochs, device))
        if device == "cuda":
            peak_gb.append(round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
            torch.cuda.empty_cache()  # the Ray worker needs the memory next
        return rates

    peak_memory: dict[str, list[float]] = {side: [] for side in RAY_SIDES}

    def ray_side(side: str, augment_on: str, round_: int, cache_budget: str = "auto") -> list[float]:
        run_cfg = dataclasses.replace(train_cfg, run_dir=str(work / f"train-suite-{side}-{round_}"),
                                      augment_on=augment_on, cache_budget=cache_budget)  # a fresh run
        train_backbones(run_cfg)
        metrics = RunPaths.of(run_cfg.run_dir).model(cfg.backbone) / "metrics.jsonl"
        rows = [row for row in map(json.loads, metrics.read_text().splitlines()) if row["epoch"] >= 1]
        peaks = [row[key] for row in rows for key in ("peak_rss_gb", "gpu_peak_memory_gb") if key in row]
        if peaks:
            peak_memory[side].append(max(peaks))
        return [row["images_per_s"] for row in rows]

    def worker_side() -> list[float]:
        log("train suite: the plain loop inside a Ray Train worker (no Ray Data) ...")
        return plain_loop_in_ray_train(cfg, train_cfg, images, labels, threads, device == "cuda")

    # This machine's speed drifts by more than the gap being measured, so every Ray-side run is compared
    # with the plain runs just before and after it: plain, ray, plain, ray_data, plain, worker, plain, ...
    # (whole training runs, not single calls: hence not benchmarks.common.interleave)
    measures = {"ray": lambda r: ray_side("ray", "device", r),
                "ray_stream": lambda r: ray_side("ray_stream", "device", r, cache_budget="0"),
                "ray_data": lambda r: ray_side("ray_data", "data", r), "worker": lambda r: worker_side()}
    sides = [side for side in RAY_SIDES if side in cfg.train_sides]
    runs: dict[str, list[list[float]]] = {"plain": [plain_side()], **{side: [] for side in sides}}
    ratios: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(min(cfg.rounds, TRAIN_ROUNDS)):
        for side in sides:
            runs[side].append(sampled(side, functools.partial(measures[side], round_)))
            runs["plain"].append(plain_side())
            around = statistics.mean(statistics.median(rates[1:]) for rates in runs["plain"][-2:])
            ratios[side].append(statistics.median(runs[side][-1][1:]) / around)

    def median_of(side: str) -> float:  # epochs after each run's warm-up epoch
        return round(statistics.median(r for rates in runs[side] for r in rates[1:]), 1)

    def over(side: str, other: str) -> float | None:
        """``side``'s ratio to the plain runs beside it over ``other``'s: the machine's drift cancels."""
        if side not in ratios or other not in ratios:
            return None
        return round(statistics.median(ratios[side]) / statistics.median(ratios[other]), 2)

    names = {"ray": "", "ray_stream": "ray_stream_", "ray_data": "ray_data_", "worker": "worker_"}
    ratio_names = {"ray": "ratio", "ray_stream": "ratio_streamed", "ray_data": "ratio_ray_data",
                   "worker": "ratio_worker_alone"}
    return {
        "backbone": cfg.backbone, "images": len(labels), "image_size": train_cfg.image_size,
        "batch_size": cfg.batch_size, "device": gpu or "CPU", "torch_threads": threads, "precision": precision,
        **{f"{side}_images_per_s": [[round(r, 1) for r in rates] for rates in runs[side]] for side in runs},
        **{f"{side}_median": median_of(side) for side in runs},
        **{f"{names[side]}ratios": [round(float(r), 3) for r in ratios[side]] for side in sides},
        **{ratio_names[side]: round(statistics.median(ratios[side]), 2) for side in sides},
        # each side against the plain runs beside it, so the machine's drift between the two sides cancels
        "ratio_device_over_ray_data_augmentation": over("ray", "ray_data"),
        "ratio_streamed_over_cached": over("ray_stream", "ray"),
        "peak_worker_memory_gb": {side: max(values) for side, values in peak_memory.items() if values} or None,
        "gpu_utilisation_percent": {side: values for side, values in utilisation.items() if values} or None,
        "plain_peak_gpu_memory_gb": max(peak_gb) if peak_gb else None,
    }


def summary(r: dict) -> str:
    parts = []
    if "ratio" in r:
        parts.append(f"jobs.train {r['ray_median']} images/s vs plain PyTorch loop {r['plain_median']} -> "
                     f"{r['ratio']}x (rounds {r['ratios']})")
    if "ratio_streamed" in r:
        parts.append(f"streamed (--cache-budget 0) {r['ray_stream_median']} -> {r['ratio_streamed']}x"
                     + (f", {r['ratio_streamed_over_cached']}x the cached run" if r["ratio_streamed_over_cached"]
                        else ""))
    if "ratio_ray_data" in r:
        parts.append(f"with Ray Data augmenting on CPUs {r['ray_data_median']} -> {r['ratio_ray_data']}x"
                     + (f" (device / Ray Data augmentation {r['ratio_device_over_ray_data_augmentation']}x)"
                        if r["ratio_device_over_ray_data_augmentation"] else ""))
    if "ratio_worker_alone" in r:
        parts.append(f"the plain loop in a Ray Train worker {r['worker_median']} -> {r['ratio_worker_alone']}x")
    line = f"{r['backbone']} at {r['image_size']} px on {r['device']} ({r['precision']}): " + "; ".join(parts)
    if r.get("peak_worker_memory_gb"):
        line += "; peak worker memory GB " + ", ".join(f"{side} {gb}" for side, gb in r["peak_worker_memory_gb"].items())
    if r.get("gpu_utilisation_percent"):
        line += "; GPU utilisation % " + ", ".join(f"{side} {statistics.mean(v):.0f}"
                                                  for side, v in r["gpu_utilisation_percent"].items())
    return line
