"""``cifar-embed <stage> [flags]``: the console script (each stage is also ``python -m jobs.<stage>``),
and :func:`run_job`, which every job's ``cli`` runs: parse the flags, call ``main``, map bad input to exit 2."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lib.config import parse_config
from lib.errors import EXIT_ENVIRONMENT, EXIT_USER_ERROR, EnvironmentProblem, UserError, disk_error

C = TypeVar("C")

# stage name -> (module, one-line purpose); a module provides ``cli(argv) -> int``.
STAGES = {
    "prepare": ("jobs.prepare", "decode an image source into Parquet train/val/test splits"),
    "train": ("jobs.train", "fine-tune backbones with a triplet loss on Ray Train"),
    "tune": ("jobs.tune", "search triplet margin, learning rate (and more) with Ray Tune; writes best.json"),
    "evaluate": ("jobs.evaluate", "embed with every model on Ray Data; retrieval, probes, clusters, stacking, report"),
    "search": ("jobs.search", "nearest train images of image files or test ids, from the saved index"),
    "serve": ("jobs.serve", "browse a run and search it over HTTP: a Ray Serve app and a page"),
    "pipeline": ("jobs.pipeline", "prepare, (tune,) train and evaluate under one RUN; reruns resume"),
    "benchmark": ("jobs.benchmark", "measure the Ray paths against plain baselines"),
}


def run_job(main: Callable[[C], Any], config_cls: type[C], argv: Sequence[str] | None, prog: str,
            failures: tuple[type[Exception], ...] = ()) -> int:
    """Parse ``argv`` into ``config_cls`` and run ``main``: a :class:`UserError` becomes one line and exit 2,
    an :class:`EnvironmentProblem` one line and exit 3, one of ``failures`` (the work ran but some of it
    failed) one line and exit 1."""
    try:
        config = parse_config(config_cls, argv, prog=prog)
        main(config)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except failures as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except EnvironmentProblem as err:
        print(f"{prog}: environment error: {err}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except OSError as err:
        disk = disk_error(err)
        if disk is None:
            raise
        print(f"{prog}: error: {disk}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {purpose}" for name, (_, purpose) in STAGES.items()]
    return "usage: cifar-embed <stage> [--help | flags]\n\nstages:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"cifar-embed: error: unknown stage {stage!r} (choose from {', '.join(STAGES)})", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    return module.cli(rest)


if __name__ == "__main__":
    sys.exit(main())
