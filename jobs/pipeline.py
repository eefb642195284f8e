"""Everything end to end under one RUN: prepare -> (tune) -> train -> evaluate.

    python -m jobs.pipeline --source cifar10 --run-dir RUN [--preset smoke|quick|full] [--tune] [--epochs N]

Data goes to ``RUN/data``, models to ``RUN/models``, tuning to ``RUN/tune``, the report to
``RUN/eval`` (lib.paths). Every stage skips work whose outputs are complete, so rerunning after a crash
(or after a finished run) resumes where it stopped. Locally it starts its own Ray; with ``RAY_ADDRESS``
set (``ray job submit``) it runs on that cluster. Stage timings go to ``RUN/pipeline.json``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.cli import command_line, run_job
from lib.backbones import check_backbones
from lib.config import check_ranges, option, to_dict
from lib.console import log
from lib.devices import USE_GPU_HELP, UseGpu
from lib.evaluation import EvaluateConfig
from lib.io import ensure_writable_dir, write_json
from lib.losses import Miner
from lib.paths import RunPaths
from lib.precision import PRECISION_HELP, Precision
from lib.prepare import PrepareConfig
from lib.training import AUGMENT_ON_HELP, AugmentOn, Preset, TrainConfig
from onray.evaluate import evaluate_run
from onray.prepare import prepare_data
from onray.runtime import check_cluster_paths, init_ray
from onray.trainer import BackboneFailed, train_backbones

DEFAULT_BACKBONES = ("densenet121", "resnet50", "vgg16")
# Training settings the pipeline passes through to jobs.train (None: the preset's value).
TRAIN_OVERRIDES = ("image_size", "embedding_dim", "epochs", "batch_size", "lr", "margin", "miner",
                   "train_per_class", "val_per_class", "patience", "precision", "augment_on", "gpus_per_worker")


@dataclass(frozen=True)
class PipelineConfig:
    """Prepare the data, optionally tune, train every backbone concurrently and evaluate, under one RUN."""

    source: str = option(help="cifar10, cifar10:PATH or imagefolder:PATH (see jobs.prepare)")
    run_dir: str = option(help="run folder: data, models, tune and eval all go under it")
    preset: Preset = option("quick", help="sizes of training and tuning (see jobs.train)")
    backbones: tuple[str, ...] = option(DEFAULT_BACKBONES, help="backbones to train and stack")
    weights: str = option("", help="imagenet | none | PATH (default: by preset)")
    tune: bool = option(False, help="search margin and lr per backbone with jobs.tune (its preset's trial sizes), "
                                    "then train each backbone with its best.json")
    num_workers: int | None = option(None, help="Ray Train workers per backbone (default: by cluster)")
    use_gpu: UseGpu = option("auto", help=USE_GPU_HELP)
    storage: str = option("", help="Ray Train/Tune storage: a path or s3://... (default: inside RUN)")
    include_untrained: bool = option(True, help="also evaluate each backbone's untrained network")
    skip_bad_images: bool = option(False, help="see jobs.prepare")
    val_fraction: float = option(0.1, help="share of each class of the source's train split held out as val")
    seed: int = option(0, help="seed of the val split, subsets and initialisation")
    # the common jobs.train overrides (None: the preset's value); tuned keys from best.json win over them
    image_size: int | None = option(None, help="training input side in pixels (jobs.train --image-size)")
    embedding_dim: int | None = option(None, help="embedding size D")
    epochs: int | None = option(None, help="maximum training epochs")
    batch_size: int | None = option(None, help="training batch size per worker")
    lr: float | None = option(None, help="peak learning rate")
    margin: float | None = option(None, help="triplet margin")
    miner: Miner | None = option(None, help="triplet mining: semihard, hard, all or easy")
    train_per_class: int | None = option(None, help="train images per class (0 = all)")
    val_per_class: int | None = option(None, help="val images per class for the per-epoch mAP@5 (0 = all)")
    patience: int | None = option(None, help="early stopping patience in epochs (0 = never)")
    precision: Precision = option("auto", help=PRECISION_HELP)
    augment_on: AugmentOn = option("device", help=AUGMENT_ON_HELP)
    gpus_per_worker: str = option("auto", help="GPU share of each training worker (jobs.train --gpus-per-worker)")

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(source=self.source, data_dir=str(RunPaths.of(self.run_dir).data), seed=self.seed,
                             val_fraction=self.val_fraction, skip_bad_images=self.skip_bad_images)

    def __post_init__(self) -> None:
        check_backbones(self.backbones)
        check_ranges(self, positive=("num_workers",), non_negative=("seed",))
        # the same checks jobs.prepare and jobs.train make, now rather than after preparing the data
        self.prepare_config()
        TrainConfig(data_dir="", run_dir="", backbones=self.backbones, preset=self.preset,
                    **{key: getattr(self, key) for key in TRAIN_OVERRIDES})


def prepare_stage(cfg: PipelineConfig) -> None:
    prepare_data(cfg.prepare_config())


def train_config(cfg: PipelineConfig, backbones: tuple[str, ...], hparams: str = "") -> TrainConfig:
    return TrainConfig(data_dir=str(RunPaths.of(cfg.run_dir).data), run_dir=cfg.run_dir, backbones=backbones,
                       preset=cfg.preset, weights=cfg.weights, hparams=hparams, num_workers=cfg.num_workers,
                       use_gpu=cfg.use_gpu, storage=cfg.storage, seed=cfg.seed,
                       **{key: getattr(cfg, key) for key in TRAIN_OVERRIDES})


def tune_stage(cfg: PipelineConfig) -> dict[str, str]:
    """Tune each backbone (a finished tune is not rerun); returns backbone -> its best.json."""
    from tuning.run import TuneJobConfig, tune_backbone

    run = RunPaths.of(cfg.run_dir)
    return {backbone: str(tune_backbone(TuneJobConfig(
        data_dir=str(run.data), run_dir=str(run.root), backbone=backbone, preset=cfg.preset, weights=cfg.weights,
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, storage=cfg.storage, seed=cfg.seed)))
        for backbone in cfg.backbones}


def train_stage(cfg: PipelineConfig, best: dict[str, str]) -> None:
    """All backbones concurrently; with tuning results, each backbone takes its own best.json."""
    if not best:
        train_backbones(train_config(cfg, cfg.backbones))
        return
    failures: dict[str, str] = {}
    for backbone in cfg.backbones:  # hyper-parameters differ per backbone: one training each
        try:
            train_backbones(train_config(cfg, (backbone,), best[backbone]))
        except BackboneFailed as err:
            failures.update(err.failures)
    if failures:
        raise BackboneFailed(failures)


def evaluate_stage(cfg: PipelineConfig) -> Path:
    out, table = evaluate_run(EvaluateConfig(
        data_dir=str(RunPaths.of(cfg.run_dir).data), run_dir=cfg.run_dir, backbones=cfg.backbones,
        include_untrained=cfg.include_untrained, use_gpu=cfg.use_gpu, precision=cfg.precision, seed=cfg.seed))
    print(table, end="")
    return out


def main(cfg: PipelineConfig) -> Path:
    check_cluster_paths(run_dir=cfg.run_dir, storage=cfg.storage)
    run = RunPaths.of(cfg.run_dir)
    cfg = dataclasses.replace(cfg, run_dir=str(run.root))
    ensure_writable_dir(run.root)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, work, *args) -> Any:
        log(f"pipeline: {name} ...")
        began = time.perf_counter()
        result = work(*args)
        timings[name] = round(time.perf_counter() - began, 1)
        log(f"pipeline: {name} done in {timings[name] / 60:.1f} min")
        return result

    stage("prepare", prepare_stage, cfg)
    init_ray()
    best = stage("tune", tune_stage, cfg) if cfg.tune else {}
    try:
        stage("train", train_stage, cfg, best)
    except BackboneFailed as err:
        # the backbones that trained are still evaluated; the exit code still says something failed
        log(f"pipeline: {err}; evaluating the ones that finished")
        trained = tuple(b for b in cfg.backbones if b in run.trained_backbones())
        if not trained:
            raise
        stage("evaluate", evaluate_stage, dataclasses.replace(cfg, backbones=trained))
        _finish(cfg, run, timings, started)
        raise
    out = stage("evaluate", evaluate_stage, cfg)
    _finish(cfg, run, timings, started)
    return out


def _finish(cfg: PipelineConfig, run: RunPaths, timings: dict[str, float], started: float) -> None:
    total = round(time.perf_counter() - started, 1)
    write_json(run.pipeline_record, {"stages_seconds": timings, "total_seconds": total, "config": to_dict(cfg)})
    print(f"\npipeline finished in {total / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items())})")
    print(f"report:   {run.eval / 'results.md'}\nmetrics:  {run.eval / 'metrics.json'}")
    print("pictures: " + ", ".join(str(p) for p in sorted(run.eval.glob("*.png"))))


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, PipelineConfig, argv, prog="jobs.pipeline", failures=(BackboneFailed,))


if __name__ == "__main__":
    sys.exit(command_line(cli))
