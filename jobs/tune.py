"""Search the triplet margin and learning rate (and more) with Ray Tune; each trial is a real Ray Train run.

    python -m jobs.tune --data-dir DATA --run-dir RUN --backbone resnet50 [--preset quick] [--search optuna]

Writes ``RUN/tune/<backbone>/``: Tune's own results, ``trials.md``, ``tune.png`` and, last,
``best.json``, which ``jobs.train --hparams`` accepts. Rerunning into the same RUN resumes an
interrupted tune and leaves a finished one alone. The work is :func:`tuning.run.tune_backbone`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import command_line, run_job
from tuning.run import TuneJobConfig, dry_run, tune_backbone

__all__ = ["TuneJobConfig", "cli", "main"]


def main(cfg: TuneJobConfig) -> Path:
    """Tune one backbone; returns its ``best.json``."""
    return tune_backbone(cfg)


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, TuneJobConfig, argv, prog="jobs.tune", dry_run=dry_run)


if __name__ == "__main__":
    sys.exit(command_line(cli))
