"""Benchmarks: the project's Ray paths against plain single-process / plain PyTorch baselines.

    python -m jobs.benchmark --suites prepare,inputs,train,retrieval,tsne,embed,serve,scale [--source imagefolder:PATH] [--work-dir DIR]

Every ratio compares two measurements taken in this one run on this one machine, so a noisy
machine moves both. Suites interleave baseline and candidate rounds and report medians.
Each suite is a module of :mod:`benchmarks` (what its sides measure, and why, is said there);
this job runs the chosen ones, prints each one's JSON as it finishes, then one summary line per suite.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from benchmarks import embed, inputs, prepare, retrieval, scale, serve, train, tsne
from benchmarks.common import BenchmarkConfig
from jobs.cli import command_line, run_job
from lib.devices import available_cpus
from lib.io import ensure_writable_dir, write_json

# name -> module with ``run(cfg, work) -> dict`` and ``summary(result) -> str`` (names: benchmarks.common.SUITE_NAMES)
SUITES: dict[str, ModuleType] = {
    "prepare": prepare, "inputs": inputs, "train": train, "retrieval": retrieval, "tsne": tsne, "embed": embed,
    "serve": serve, "scale": scale}


def main(cfg: BenchmarkConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="cifar-bench-") as tmp:
        work = ensure_writable_dir(cfg.work_dir) if cfg.work_dir else Path(tmp)
        results = {"machine": {"cpus": available_cpus(), "python": sys.version.split()[0]}}
        for name in cfg.suites:
            results[name] = SUITES[name].run(cfg, work)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    for name in cfg.suites:
        print(f"{name}: {SUITES[name].summary(results[name])}")
    if cfg.output:
        write_json(cfg.output, results)
    return results


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, BenchmarkConfig, argv, prog="jobs.benchmark")


if __name__ == "__main__":
    sys.exit(command_line(cli))
