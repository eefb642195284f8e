"""Embeddings of every split with every model, retrieval mAP@5, clusters, stacking and the report.

    python -m jobs.evaluate --data-dir DATA --run-dir RUN [--backbones ...] [--include-untrained]

Embedding runs on a Ray Data actor pool; the rest in this process. Outputs: ``RUN/embeddings/<name>/``
(lib.embedding) and ``RUN/eval/`` (lib.evaluation); rerunning with the same models, data and flags does
nothing. The work is :func:`onray.evaluate.evaluate_run`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import command_line, run_job
from lib.evaluation import OUTPUTS, EvaluateConfig

__all__ = ["OUTPUTS", "EvaluateConfig", "cli", "main"]


def main(cfg: EvaluateConfig) -> Path:
    from onray.evaluate import evaluate_run  # here: --help answers without importing Ray

    out, table = evaluate_run(cfg)
    print(table, end="")
    return out


def plan(cfg: EvaluateConfig):
    """The embedding actors' plan that ``--dry-run`` prints."""
    from onray.evaluate import dry_run

    return dry_run(cfg)


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, EvaluateConfig, argv, prog="jobs.evaluate", dry_run=plan)


if __name__ == "__main__":
    sys.exit(command_line(cli))
