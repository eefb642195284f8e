"""What the suites share: the job's config, interleaved rounds, the prepared DATA and synthetic vectors."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lib.backbones import check_backbones
from lib.config import check_ranges, option
from lib.data.reader import PreparedData
from lib.errors import UserError
from lib.retrieval.index import l2_normalize

# The suites' names, in the order --help lists them; jobs.benchmark maps each to its module.
SUITE_NAMES = ("prepare", "inputs", "train", "retrieval", "tsne", "embed", "serve", "scale")
# <repo parent>/shared/datasets/cifar10 (this file is <repo>/benchmarks/common.py)
DEFAULT_SOURCE = "imagefolder:" + os.environ.get(
    "CIFAR10_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"))
N_CLASSES = 10


@dataclass(frozen=True)
class BenchmarkConfig:
    """Measure the Ray paths against plain baselines in one run and print the ratios."""

    suites: tuple[str, ...] = option(("prepare", "inputs"), help="which suites to run: " + ", ".join(SUITE_NAMES))
    source: str = option(DEFAULT_SOURCE, help="image source to benchmark on (an imagefolder for 'prepare')")
    work_dir: str = option("", help="where to prepare data (default: a temporary folder, removed after)")
    rounds: int = option(5, help="measured rounds per side (after one warm-up round each; the train suite runs "
                                 "at most 2)")
    batch_size: int = option(128, help="batch size of the input-pipeline and train suites")
    backbone: str = option("resnet50", help="model of the train suite")
    train_images: int = option(5000, help="train images per epoch in the train suite (a class-balanced subset; "
                                           "5000 is the quick preset's)")
    epochs: int = option(3, help="epochs per side in the train suite (the first is a warm-up)")
    train_sides: tuple[str, ...] = option(("ray", "ray_stream", "ray_data", "worker"),
                                          help="the train suite's Ray sides, each against the plain loop: ray "
                                               "(jobs.train, rows cached on the device), ray_stream (--cache-budget "
                                               "0: streamed every epoch), ray_data (--augment-on data), worker (the "
                                               "plain loop in a Ray Train worker)")
    embed_backbones: tuple[str, ...] = option(("resnet50",), help="networks the embed suite runs in one pass "
                                                                  "(jobs.evaluate after a 3-backbone jobs.train: "
                                                                  "densenet121,resnet50,vgg16)")
    embed_actors: int = option(0, help="actors of the embed suite's Ray side (0: what jobs.evaluate picks, one per "
                                       "GPU, else one single-threaded actor per core)")
    image_size: int | None = option(None, help="image side of the inputs and train suites' augmentation and of the "
                                                "embed suite's networks (default: the stored size)")
    serve_run: str = option("", help="evaluated RUN the serve suite queries (default: a synthetic run, an "
                                     "untrained --backbone over a --serve-gallery rows index)")
    serve_gallery: int = option(50_000, help="rows of the serve suite's synthetic gallery index")
    serve_clients: int = option(8, help="concurrent HTTP clients of the serve suite's throughput loop")
    scale_sizes: tuple[int, ...] = option((100_000, 1_000_000, 5_000_000), help="gallery rows of the scale suite's "
                                                                                 "synthetic 128-d galleries")
    scale_kinds: tuple[str, ...] = option(("exact", "ivf", "hnsw"), help="index kinds the scale suite measures "
                                                                         "(the others are reported as not run)")
    scale_recall: float = option(0.95, help="recall@5 the scale suite tunes each approximate index to reach")
    scale_queries: int = option(300, help="one-query searches the scale suite times per index (p50, p99)")
    scale_build_budget_s: float = option(600.0, help="an HNSW build expected (from the previous size's) to take "
                                                     "longer than this is not run, and reported so")
    output: str = option("", help="also write the results as JSON to this file")

    def __post_init__(self) -> None:
        unknown = set(self.suites) - set(SUITE_NAMES)
        if unknown:
            raise UserError(f"unknown benchmark suite(s) {', '.join(sorted(unknown))} "
                            f"(choose from {', '.join(SUITE_NAMES)})")
        if self.epochs < 2:
            raise UserError(f"--epochs must be at least 2 (the first is a warm-up), got {self.epochs}")
        if self.embed_actors < 0:
            raise UserError(f"--embed-actors must be 0 (automatic) or more, got {self.embed_actors}")
        check_ranges(self, positive=("batch_size", "train_images", "image_size", "serve_gallery", "serve_clients",
                                     "scale_queries", "scale_build_budget_s"))
        if not self.scale_sizes or min(self.scale_sizes) < 1000:
            raise UserError(f"--scale-sizes must be gallery sizes of at least 1000 rows, got {self.scale_sizes}")
        if not self.scale_kinds or set(self.scale_kinds) - {"exact", "ivf", "hnsw"}:
            raise UserError(f"--scale-kinds must be some of exact, ivf, hnsw, got {','.join(self.scale_kinds)}")
        if not 0.0 < self.scale_recall <= 1.0:
            raise UserError(f"--scale-recall must be in (0, 1], got {self.scale_recall}")
        if self.rounds < 1:
            raise UserError(f"--rounds must be at least 1, got {self.rounds}")
        check_backbones(self.embed_backbones)
        sides = ("ray", "ray_stream", "ray_data", "worker")
        if not self.train_sides or set(self.train_sides) - set(sides):
            raise UserError(f"--train-sides takes some of {', '.join(sides)}, got {','.join(self.train_sides)}")


@dataclass
class Rounds:
    """What :func:`interleave` measured, per side: the wall seconds and this process's CPU seconds (all its
    threads) of every measured call, and what the calls returned (every value, or the last one only)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    values: dict[str, list[Any]]

    def last(self, side: str) -> Any:
        return self.values[side][-1]


def interleave(sides: dict[str, Callable[[], Any]], rounds: int, warmup: bool = False,
               keep: Literal["all", "last"] = "all") -> Rounds:
    """Call the sides in turn, ``rounds`` times, timing each call; first one unmeasured call of each when
    ``warmup``. ``keep="last"`` holds only each side's latest value (large results, such as embeddings).

    Every side runs in every stretch of the run, so a machine that slows down or speeds up moves all of
    them; CPU seconds move less than wall seconds with other people's load on a shared machine.
    """
    if warmup:
        for measure in sides.values():
            measure()
    measured = Rounds({name: [] for name in sides}, {name: [] for name in sides}, {name: [] for name in sides})
    for _ in range(rounds):
        for name, measure in sides.items():
            wall, cpu = time.perf_counter(), time.process_time()
            value = measure()
            measured.wall[name].append(time.perf_counter() - wall)
            measured.cpu[name].append(time.process_time() - cpu)
            if keep == "last":
                measured.values[name].clear()
            measured.values[name].append(value)
    return measured


def _median(values: list[float]) -> float:
    """The median to 4 significant figures (a tiny run's 0.0004 s stays measurable, unlike a fixed 3 decimals)."""
    return significant(statistics.median(values), 4)


def significant(value: float, digits: int = 3) -> float:
    """``value`` to ``digits`` significant figures: a small suite's 0.004 s or 0.0012x ratio stays visible
    instead of rounding to 0.0."""
    return float(f"{value:.{digits}g}")


def blas_kernels() -> dict[str, str]:
    """Which kernel family each loaded BLAS uses (threadpoolctl), e.g. faiss's bundled OpenBLAS."""
    from threadpoolctl import threadpool_info

    return {Path(info["filepath"]).name: str(info.get("architecture"))
            for info in threadpool_info() if info.get("internal_api") == "openblas"}


def prepared(cfg: BenchmarkConfig, work: Path) -> PreparedData:
    """A prepared DATA for ``cfg.source`` in ``work``, prepared (on Ray) on first use."""
    data = PreparedData.find(work / "prepared")
    if data is None:
        from lib.prepare import PrepareConfig
        from onray.prepare import prepare_data

        data = PreparedData.open(prepare_data(PrepareConfig(source=cfg.source, data_dir=str(work / "prepared"))))
    return data


def class_structured_unit_vectors(n: int, dim: int, seed: int, spread: float | None = None,
                                  centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors around one random direction per class, labels (n,), centres (10, dim).

    ``spread`` is the noise norm relative to the unit class direction. The default, 3.3 * (dim / 128)
    ** 0.25, keeps the classes about as entangled at every dimension (mAP@5 of 10k queries against
    a 50k gallery near 0.7 at 128-d and 2048-d, like usable but imperfect embeddings), because the
    noise in a dot product of random directions shrinks like 1 / sqrt(dim).
    Pass the ``centres`` of one call to another to draw a second split of the same classes.
    """
    if spread is None:
        spread = 3.3 * (dim / 128) ** 0.25
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = l2_normalize(rng.normal(size=(N_CLASSES, dim)))
    labels = rng.integers(0, N_CLASSES, n)
    noise = rng.normal(size=(n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return l2_normalize(centres[labels] + noise), labels, centres
