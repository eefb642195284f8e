"""Benchmarks: the project's Ray paths against plain single-process / plain PyTorch baselines.

    python -m jobs.benchmark --suites prepare,inputs,train,retrieval,tsne,embed [--source imagefolder:PATH] [--work-dir DIR]

Every ratio compares two measurements taken in this one run on this one machine, so a noisy
machine moves both. Suites interleave baseline and candidate rounds and report medians.

- ``prepare``: ``python -m jobs.prepare`` in a fresh process (Ray start included) against a plain
  single-process PIL decode loop over the same files.
- ``inputs``: augmented batches/s from the Ray Data pipeline (jobs.inputs) against the plain
  PyTorch DataLoader (lib.loader), same transform, batch size and CPU count.
- ``train``: training images/s of ``jobs.train`` (Ray Data streaming augmented batches into one
  Ray Train worker) against a plain PyTorch loop over the same images held in memory as a uint8
  tensor: same model, triplet objective, optimiser, P x K batches, augmentation (applied inline,
  batch by batch: about 3 ms per 128 images at 32 px, under 1 % of a ResNet50 step) and torch
  threads, on the quick preset's training subset (500 images per class). A third side runs the plain
  loop inside a Ray Train worker (same tensors, no Ray Data): it separates what the worker process
  costs from what streaming the data beside it costs. Each Ray-side run is compared with the plain
  runs just before and after it (this machine's speed drifts); rates exclude each run's first epoch.
"""

from __future__ import annotations

import dataclasses
import functools
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
from lib.backbones import check_backbones
from lib.config import option
from lib.dataset import complete_manifest
from lib.errors import UserError
from lib.io import ensure_writable_dir, write_json
from lib.sources import list_image_folder, parse_source

TRAIN_ROUNDS = 2  # a round of the train suite trains twice and runs the plain loop twice: about 6 minutes here
DEFAULT_SOURCE = "imagefolder:" + os.environ.get(
    "CIFAR10_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"))


@dataclass(frozen=True)
class BenchmarkConfig:
    """Measure the Ray paths against plain baselines in one run and print the ratios."""

    suites: tuple[str, ...] = option(("prepare", "inputs"), help="which suites to run: prepare, inputs, train, "
                                                                  "retrieval, tsne, embed")
    source: str = option(DEFAULT_SOURCE, help="image source to benchmark on (an imagefolder for 'prepare')")
    work_dir: str = option("", help="where to prepare data (default: a temporary folder, removed after)")
    rounds: int = option(5, help="measured rounds per side (after one warm-up round each; the train suite runs "
                                 "at most 2)")
    batch_size: int = option(128, help="batch size of the input-pipeline and train suites")
    backbone: str = option("resnet50", help="model of the train suite")
    train_images: int = option(5000, help="train images per epoch in the train suite (a class-balanced subset; "
                                           "5000 is the quick preset's)")
    epochs: int = option(3, help="epochs per side in the train suite (the first is a warm-up)")
    embed_backbones: tuple[str, ...] = option(("resnet50",), help="networks the embed suite runs in one pass "
                                                                  "(jobs.evaluate after a 3-backbone jobs.train: "
                                                                  "densenet121,resnet50,vgg16)")
    embed_actors: int = option(0, help="actors of the embed suite's Ray side (0: what jobs.evaluate picks, one per "
                                       "GPU, else one single-threaded actor per core)")
    image_size: int | None = option(None, help="image side of the inputs suite's augmentation and of the embed "
                                                "suite's networks (default: the stored size)")
    output: str = option("", help="also write the results as JSON to this file")

    def __post_init__(self) -> None:
        unknown = set(self.suites) - set(SUITES)
        if unknown:
            raise UserError(f"unknown benchmark suite(s) {', '.join(sorted(unknown))} "
                            f"(choose from {', '.join(SUITES)})")
        if self.epochs < 2:
            raise UserError(f"--epochs must be at least 2 (the first is a warm-up), got {self.epochs}")
        if self.embed_actors < 0:
            raise UserError(f"--embed-actors must be 0 (automatic) or more, got {self.embed_actors}")
        if self.rounds < 1:
            raise UserError(f"--rounds must be at least 1, got {self.rounds}")
        check_backbones(self.embed_backbones)


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


def plain_training_epochs(cfg: BenchmarkConfig, train_cfg, images, labels, epochs: int, bf16: bool) -> list[float]:
    """Images/s of each epoch of a plain PyTorch triplet training loop over in-memory (N, H, W, 3) uint8
    ``images``, augmented batch by batch as jobs.train's input pipeline does (in bf16 when ``bf16``,
    as jobs.train's CPU worker runs)."""
    import torch

    from lib.augment import AugmentSettings, augment_batch, normalize
    from lib.backbones import build_model
    from lib.batching import balanced_batches
    from lib.losses import TripletObjective
    from lib.precision import forward, prepare_for_bf16
    from lib.training import make_optimizer

    torch.manual_seed(train_cfg.seed)
    model = prepare_for_bf16(build_model(train_cfg.backbone, train_cfg.weights, train_cfg.embedding_dim), bf16)
    optimizer, scheduler = make_optimizer(model, train_cfg, max(1, len(labels) // cfg.batch_size))
    objective = TripletObjective(train_cfg.margin, train_cfg.miner)
    settings = AugmentSettings(image_size=train_cfg.image_size)
    rates = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        stream = ({"image": augment_batch(images[order[i:i + cfg.batch_size]], settings),
                   "label": labels[order[i:i + cfg.batch_size]]} for i in range(0, len(order), cfg.batch_size))
        started, count = time.perf_counter(), 0
        for batch in balanced_batches(stream, cfg.batch_size, train_cfg.samples_per_class, seed=epoch):
            loss, _ = objective(forward(model, normalize(batch["image"]), bf16), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            count += len(batch["label"])
        rates.append(count / (time.perf_counter() - started))
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


def train_suite(cfg: BenchmarkConfig, work: Path) -> dict:
    import torch

    from jobs import train
    from lib.dataset import read_split
    from lib.training import TrainConfig, per_class_subset

    data_dir = _prepared(cfg, work)
    manifest = complete_manifest(data_dir)
    per_class = max(1, cfg.train_images // len(manifest["classes"]))
    train_cfg = TrainConfig(data_dir=str(data_dir), run_dir=str(work / "train-suite"), backbones=(cfg.backbone,),
                            preset="quick", epochs=cfg.epochs, batch_size=cfg.batch_size, train_per_class=per_class,
                            val_per_class=10, patience=0, num_workers=1, use_gpu="false").resolve()
    split = read_split(data_dir, "train")
    keep = set(per_class_subset(split.ids, split.labels, per_class, train_cfg.seed).tolist())
    rows = np.asarray([str(i) in keep for i in split.ids])
    images = torch.from_numpy(np.ascontiguousarray(split.images[rows]))
    labels = torch.from_numpy(split.labels[rows].astype(np.int64))
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # what jobs.train gives its single CPU worker
    from lib.precision import uses_bf16

    bf16 = uses_bf16(train_cfg.precision, "cpu")  # the precision jobs.train's CPU worker runs in
    precision = "bf16" if bf16 else "fp32"
    log(f"train suite: {cfg.backbone}, {len(labels)} images, batch {cfg.batch_size}, {threads} torch threads, "
        f"{precision}")
    init_ray()

    def plain_side() -> list[float]:
        return plain_training_epochs(cfg, train_cfg, images, labels, cfg.epochs, bf16)

    def ray_side(round_: int) -> list[float]:
        run_cfg = dataclasses.replace(train_cfg, run_dir=str(work / f"train-suite-{round_}"))  # a fresh run
        train.main(run_cfg)
        metrics = Path(run_cfg.run_dir) / "models" / cfg.backbone / "metrics.jsonl"
        return [row["images_per_s"] for row in map(json.loads, metrics.read_text().splitlines()) if row["epoch"] >= 1]

    def worker_side() -> list[float]:
        log("train suite: the plain loop inside a Ray Train worker (no Ray Data) ...")
        return plain_loop_in_ray_train(cfg, train_cfg, images, labels, threads, bf16)

    # This machine's speed drifts by more than the gap being measured, so every Ray-side run is compared
    # with the plain runs just before and after it: plain, Ray, plain, worker, plain, Ray, plain, ...
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


def retrieval_suite(cfg: BenchmarkConfig, work: Path) -> dict:
    from jobs.benchmark_eval import retrieval_suite as measure

    return measure(rounds=min(cfg.rounds, 3))  # the scikit-learn loop side takes minutes per round


def tsne_suite(cfg: BenchmarkConfig, work: Path) -> dict:
    from jobs.benchmark_eval import tsne_suite as measure

    return measure(rounds=1)  # scikit-learn's side alone takes about half a minute on 2 cores


def embed_suite(cfg: BenchmarkConfig, work: Path) -> dict:
    from jobs.benchmark_eval import embed_suite as measure

    data_dir = _prepared(cfg, work)
    stored_size = int(complete_manifest(data_dir)["image_shape"][0])
    # a round embeds the whole DATA (60k CIFAR-10 images) once per side: about a minute per network here
    return measure(data_dir, rounds=min(cfg.rounds, 3), backbones=cfg.embed_backbones,
                   image_size=cfg.image_size or stored_size, num_actors=cfg.embed_actors)


SUITES: dict[str, Callable[[BenchmarkConfig, Path], dict]] = {
    "prepare": prepare_suite, "inputs": inputs_suite, "train": train_suite, "retrieval": retrieval_suite,
    "tsne": tsne_suite, "embed": embed_suite}


def _retrieval_summary(r: dict) -> str:
    return "; ".join(f"{dim[4:]}-d project/bare faiss {row['ratio_project_over_bare_faiss']}x, sklearn loop/project "
                     f"{row['ratio_sklearn_loop_over_project']}x" for dim, row in r.items() if dim.startswith("dim_"))


# One line per suite, printed after all suites ran (the JSON of each is printed as it finishes).
SUMMARIES: dict[str, Callable[[dict], str]] = {
    "prepare": lambda r: (f"{r['images']} images in {r['prepare_wall_seconds']} s wall (Ray start included); "
                          f"{r['prepare_images_per_s_wall']:,}/s wall and {r['prepare_images_per_s_decode_write']:,}"
                          f"/s decode+write vs plain PIL loop {r['plain_pil_images_per_s']:,}/s -> "
                          f"{r['ratio_wall']}x wall, {r['ratio_decode_write']}x decode+write"),
    "inputs": lambda r: (f"Ray Data {r['ray_median']} batches/s vs PyTorch DataLoader {r['torch_median']} "
                         f"batches/s ({r['dataloader_workers']} workers) -> {r['ratio']}x"),
    "train": lambda r: (f"{r['backbone']} {r['ray_median']} images/s through Ray Data + Ray Train vs plain PyTorch "
                        f"loop on in-memory tensors {r['plain_median']} images/s ({r['torch_threads']} threads, "
                        f"{r['precision']}) -> {r['ratio']}x (rounds {r['ratios']}); the plain loop inside a Ray "
                        f"Train worker {r['worker_median']} images/s -> {r['ratio_worker_alone']}x"),
    "retrieval": _retrieval_summary,
    "tsne": lambda r: (f"{r['n']} points, project {r['project']['wall_s']} s vs scikit-learn "
                       f"{r['sklearn']['wall_s']} s -> {r['speedup_wall']}x"),
    "embed": lambda r: (f"{'+'.join(r['backbones'])} on {r['images']} images at {r['image_size']} px "
                        f"({r['device']}): Ray Data actor pool {r['ray_actor_pool']['embeddings_per_s']} "
                        f"embeddings/s vs plain loop {r['plain_torch']['embeddings_per_s']} -> "
                        f"{r['ratio_ray_over_plain']}x"),
}


def main(cfg: BenchmarkConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="cifar-bench-") as tmp:
        work = ensure_writable_dir(cfg.work_dir) if cfg.work_dir else Path(tmp)
        results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
        for name in cfg.suites:
            results[name] = SUITES[name](cfg, work)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    for name in cfg.suites:
        print(f"{name}: {SUMMARIES[name](results[name])}")
    if cfg.output:
        write_json(cfg.output, results)
    return results


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, BenchmarkConfig, argv, prog="jobs.benchmark")


if __name__ == "__main__":
    sys.exit(cli())
