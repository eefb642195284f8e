"""Everything end to end under one RUN: prepare -> (tune) -> train -> evaluate.

    python -m jobs.pipeline --source cifar10 --run-dir RUN [--preset smoke|quick|full] [--tune] [--epochs N]

Data goes to ``RUN/data``, models to ``RUN/models``, tuning to ``RUN/tune``, the report to
``RUN/eval`` (lib.paths). Every stage skips work whose outputs are complete, so rerunning after a crash
(or after a finished run) resumes where it stopped. Locally it starts its own Ray; with ``RAY_ADDRESS``
set (``ray job submit``) it runs on that cluster. Stage timings go to ``RUN/pipeline.json``.
The training flags are jobs.train's (``lib.pipeline.TRAIN_SETTINGS``); the work is
:func:`onray.pipeline.run_pipeline`, with :func:`tuning.run.tune_pipeline_backbone` as its tune stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import command_line, run_job
from lib.pipeline import PipelineConfig

__all__ = ["PipelineConfig", "cli", "main"]


def main(cfg: PipelineConfig) -> Path:
    """Run every stage; returns ``RUN/eval``."""
    from onray.pipeline import run_pipeline  # here: --help answers without importing Ray
    from tuning.run import tune_pipeline_backbone

    return run_pipeline(cfg, tune_backbone=tune_pipeline_backbone)


def plan(cfg: PipelineConfig):
    """Every stage's plan that ``--dry-run`` prints."""
    from onray.pipeline import dry_run
    from tuning.run import dry_run_pipeline_backbone

    return dry_run(cfg, tune_plan=dry_run_pipeline_backbone)


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, PipelineConfig, argv, prog="jobs.pipeline", dry_run=plan)


if __name__ == "__main__":
    sys.exit(command_line(cli))
