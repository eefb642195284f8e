"""``jobs.pipeline``'s stages on Ray: prepare -> (tune) -> train -> evaluate under one RUN.

Data goes to ``RUN/data``, models to ``RUN/models``, tuning to ``RUN/tune``, the report to ``RUN/eval``
(:mod:`lib.paths`). Every stage skips work whose outputs are complete, so rerunning after a crash (or after a
finished run) resumes where it stopped. Stage timings go to ``RUN/pipeline.json``.

The tune stage is Ray Tune's, a layer above this one (:mod:`tuning`): :func:`run_pipeline` takes it as a
function of (config, backbone) -> that backbone's ``best.json``, which the job passes in.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib.config import to_dict
from lib.console import log
from lib.data.reader import SPLITS, PreparedData
from lib.evaluation import EvaluateConfig
from lib.io import ensure_writable_dir, write_json
from lib.paths import RunPaths
from lib.pipeline import PipelineConfig
from lib.planning import JobPlan, actors_job_plan, pipeline_job_plan
from onray.evaluate import evaluate_run
from onray.plan import plan_actor_pool
from onray.prepare import prepare_data
from onray.runtime import check_cluster_paths, init_ray
from onray.trainer import BackboneFailed, describe_training, plan_of, train_backbones

# (config, backbone) -> the backbone's best.json: :func:`tuning.run.tune_pipeline_backbone`
TuneBackbone = Callable[[PipelineConfig, str], Path]
# (config, backbone) -> the plan of its tune: :func:`tuning.run.dry_run_pipeline_backbone`
TunePlan = Callable[[PipelineConfig, str], JobPlan]


def dry_run(cfg: PipelineConfig, tune_plan: TunePlan | None = None) -> JobPlan:
    """``jobs.pipeline --dry-run``: the plan of each stage that uses the cluster (each tune with ``tune_plan``, the
    training, the embedding actors), with nothing prepared, trained, written or asked for. Steps per epoch need
    RUN/data prepared; without it the plan says so."""
    check_cluster_paths(run_dir=cfg.run_dir, storage=cfg.storage)
    run = RunPaths.of(cfg.run_dir)
    cfg = dataclasses.replace(cfg, run_dir=str(run.root))
    data = PreparedData.find(run.data)
    init_ray()
    stages: list[tuple[str, JobPlan]] = []
    if cfg.tune and tune_plan is not None:
        stages += [(f"tune {backbone}", tune_plan(cfg, backbone)) for backbone in cfg.backbones]
    given = cfg.train_config()
    planned, shape = plan_of(given.resolve())
    stages.append(("train", describe_training("jobs.pipeline", given, planned, shape, data)))
    actors, shape = plan_actor_pool(cfg.use_gpu)
    names = [name for backbone in cfg.backbones
             for name in (backbone, f"{backbone}-untrained")[:2 if cfg.include_untrained else 1]]
    rows = f"the {sum(data.rows(split) for split in SPLITS):,} images" if data else "the images"
    stages.append(("evaluate", actors_job_plan("jobs.pipeline", names, actors, shape, shape.gpus,
                                               (f"every model embeds {rows} of {', '.join(SPLITS)} in one pass",))))
    return pipeline_job_plan(stages)


def prepare_stage(cfg: PipelineConfig) -> None:
    prepare_data(cfg.prepare_config())


def tune_stage(cfg: PipelineConfig, tune_backbone: TuneBackbone) -> dict[str, str]:
    """Tune each backbone (a finished tune is not rerun); returns backbone -> its best.json."""
    return {backbone: str(tune_backbone(cfg, backbone)) for backbone in cfg.backbones}


def train_stage(cfg: PipelineConfig, best: dict[str, str]) -> None:
    """All backbones concurrently; with tuning results, each backbone takes its own best.json."""
    if not best:
        train_backbones(cfg.train_config())
        return
    failures: dict[str, str] = {}
    for backbone in cfg.backbones:  # hyper-parameters differ per backbone: one training each
        try:
            train_backbones(cfg.train_config((backbone,), best[backbone]))
        except BackboneFailed as err:
            failures.update(err.failures)
    if failures:
        raise BackboneFailed(failures)


def evaluate_stage(cfg: PipelineConfig) -> Path:
    out, table = evaluate_run(EvaluateConfig(
        data_dir=str(RunPaths.of(cfg.run_dir).data), run_dir=cfg.run_dir, backbones=cfg.backbones,
        include_untrained=cfg.include_untrained, use_gpu=cfg.use_gpu, precision=cfg.precision, seed=cfg.seed,
        mlflow=cfg.mlflow))
    print(table, end="")
    return out


def run_pipeline(cfg: PipelineConfig, tune_backbone: TuneBackbone | None = None) -> Path:
    """Every stage of ``cfg`` in turn; returns ``RUN/eval``. ``tune_backbone`` runs the tune stage
    (``cfg.tune``). When some backbones fail to train, the others are still evaluated and
    :class:`BackboneFailed` is raised after."""
    if cfg.tune and tune_backbone is None:
        raise TypeError("--tune needs the tune stage: run_pipeline(cfg, tune_backbone=...)")
    check_cluster_paths(run_dir=cfg.run_dir, storage=cfg.storage)
    run = RunPaths.of(cfg.run_dir)
    cfg = dataclasses.replace(cfg, run_dir=str(run.root))
    created = not run.root.exists()
    ensure_writable_dir(run.root)
    try:
        return _run_stages(cfg, run, tune_backbone)
    except BaseException:
        if created and not any(run.root.iterdir()):  # failed before writing anything (offline cifar10): no RUN
            run.root.rmdir()
        raise


def _run_stages(cfg: PipelineConfig, run: RunPaths, tune_backbone: TuneBackbone | None) -> Path:
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
    best = stage("tune", tune_stage, cfg, tune_backbone) if cfg.tune else {}
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
