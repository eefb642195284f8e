"""Prepare a data set: list a source, decode it in parallel on Ray Data, write Parquet per split.

    python -m jobs.prepare --source imagefolder:PATH|cifar10[:PATH] --data-dir DATA

Output: ``DATA/{train,val,test}/part-*.parquet`` and ``DATA/manifest.json`` (see lib.data).
Rerunning into a complete DATA does nothing; into a partial one (a crash) it prepares it again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import command_line, run_job
from lib.prepare import PrepareConfig
from onray.prepare import prepare_data

__all__ = ["PrepareConfig", "cli", "main"]


def main(cfg: PrepareConfig) -> Path:
    """Prepare ``cfg.data_dir``; returns it."""
    return prepare_data(cfg)


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, PrepareConfig, argv, prog="jobs.prepare")


if __name__ == "__main__":
    sys.exit(command_line(cli))
