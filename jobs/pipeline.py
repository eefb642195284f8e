"""Everything end to end under one RUN: prepare -> (tune) -> train -> evaluate.

    python -m jobs.pipeline --source cifar10 --run-dir RUN [--preset smoke|quick|full] [--weights none]

Data goes to ``RUN/data``, models to ``RUN/models``, tuning to ``RUN/tune``, the report to
``RUN/eval``. Every stage skips work whose outputs are complete, so rerunning after a crash (or
after a finished run) resumes where it stopped. Locally it starts its own Ray; with ``RAY_ADDRESS``
set (``ray job submit``) it runs on that cluster. Stage timings go to ``RUN/pipeline.json``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jobs import evaluate, prepare, train
from jobs.runtime import init_ray, log, run_job
from lib.backbones import check_backbones
from lib.config import option, to_dict
from lib.io import ensure_writable_dir, write_json
from lib.training import TrainConfig

DEFAULT_BACKBONES = ("densenet121", "resnet50", "vgg16")


@dataclass(frozen=True)
class PipelineConfig:
    """Prepare the data, optionally tune, train every backbone concurrently and evaluate, under one RUN."""

    source: str = option(help="cifar10, cifar10:PATH or imagefolder:PATH (see jobs.prepare)")
    run_dir: str = option(help="run folder: data, models, tune and eval all go under it")
    preset: Literal["smoke", "quick", "full"] = option("quick", help="sizes of training and tuning (see jobs.train)")
    backbones: tuple[str, ...] = option(DEFAULT_BACKBONES, help="backbones to train and stack")
    weights: str = option("", help="imagenet | none | PATH (default: by preset)")
    tune: bool = option(False, help="search margin and lr per backbone with jobs.tune before training")
    num_workers: int | None = option(None, help="Ray Train workers per backbone (default: by cluster)")
    use_gpu: Literal["auto", "true", "false"] = option("auto", help="auto uses GPUs when the cluster has them")
    storage: str = option("", help="Ray Train/Tune storage: a path or s3://... (default: inside RUN)")
    include_untrained: bool = option(True, help="also evaluate each backbone's untrained network")
    skip_bad_images: bool = option(False, help="see jobs.prepare")
    seed: int = option(0, help="seed of the val split, subsets and initialisation")

    def __post_init__(self) -> None:
        check_backbones(self.backbones)


def data_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "data"


def prepare_stage(cfg: PipelineConfig) -> None:
    prepare.main(prepare.PrepareConfig(source=cfg.source, data_dir=str(data_dir(cfg)), seed=cfg.seed,
                                       skip_bad_images=cfg.skip_bad_images))


def train_config(cfg: PipelineConfig, backbones: tuple[str, ...], hparams: str = "") -> TrainConfig:
    return TrainConfig(data_dir=str(data_dir(cfg)), run_dir=cfg.run_dir, backbones=backbones, preset=cfg.preset,
                       weights=cfg.weights, hparams=hparams, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                       storage=cfg.storage, seed=cfg.seed)


def tune_stage(cfg: PipelineConfig) -> dict[str, str]:
    """Tune each backbone (a finished tune is not rerun); returns backbone -> its best.json."""
    from jobs import tune

    best = {}
    for backbone in cfg.backbones:
        tune_cfg = tune.TuneConfig(data_dir=str(data_dir(cfg)), run_dir=cfg.run_dir, backbone=backbone,
                                   preset=cfg.preset, storage=cfg.storage)
        best[backbone] = str(tune.main(tune_cfg))
    return best


def train_stage(cfg: PipelineConfig, best: dict[str, str]) -> None:
    """All backbones concurrently; with tuning results, each backbone takes its own best.json."""
    if not best:
        train.main(train_config(cfg, cfg.backbones))
        return
    failures = []
    for backbone in cfg.backbones:  # hyper-parameters differ per backbone: one job each
        try:
            train.main(train_config(cfg, (backbone,), best[backbone]))
        except train.BackboneFailed as err:
            failures.append(str(err))
    if failures:
        raise train.BackboneFailed("; ".join(failures))


def evaluate_stage(cfg: PipelineConfig) -> Path:
    return evaluate.main(evaluate.EvaluateConfig(
        data_dir=str(data_dir(cfg)), run_dir=cfg.run_dir, backbones=cfg.backbones,
        include_untrained=cfg.include_untrained, use_gpu=cfg.use_gpu, seed=cfg.seed))


def main(cfg: PipelineConfig) -> Path:
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).expanduser().absolute()))
    run = ensure_writable_dir(cfg.run_dir)
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
    except train.BackboneFailed as err:
        # the backbones that trained are still evaluated; the exit code still says something failed
        log(f"pipeline: training failed for some backbones ({err}); evaluating the ones that finished")
        trained = tuple(b for b in cfg.backbones if (run / "models" / b / "summary.json").is_file())
        if not trained:
            raise
        stage("evaluate", evaluate_stage, dataclasses.replace(cfg, backbones=trained))
        _finish(cfg, run, timings, started)
        raise
    out = stage("evaluate", evaluate_stage, cfg)
    _finish(cfg, run, timings, started)
    return out


def _finish(cfg: PipelineConfig, run: Path, timings: dict[str, float], started: float) -> None:
    total = round(time.perf_counter() - started, 1)
    write_json(run / "pipeline.json", {"stages_seconds": timings, "total_seconds": total, "config": to_dict(cfg)})
    eval_dir = run / "eval"
    print(f"\npipeline finished in {total / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items())})")
    print(f"report:   {eval_dir / 'results.md'}\nmetrics:  {eval_dir / 'metrics.json'}")
    print("pictures: " + ", ".join(str(p) for p in sorted(eval_dir.glob("*.png"))))


def cli(argv: list[str] | None = None) -> int:
    try:
        return run_job(main, PipelineConfig, argv, prog="jobs.pipeline")
    except train.BackboneFailed as err:
        print(f"jobs.pipeline: some backbones failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())

