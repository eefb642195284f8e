"""``cifar-embed <stage> [flags]``: the console script (each stage is also ``python -m jobs.<stage>``),
and :func:`run_job`, which every job's ``cli`` runs: parse the flags, call ``main``, map bad input to exit 2."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lib import console as lib_console
from lib.config import parse_job_command_line
from lib.errors import (
    EXIT_ENVIRONMENT,
    EXIT_USER_ERROR,
    EnvironmentProblem,
    UserError,
    WorkFailed,
    disk_error,
)
from lib.paths import RunPaths
from onray.ray_lines import routine_ray_line

C = TypeVar("C")

# The switches of the jobs that can show their plan instead of running (``run_job(..., dry_run=...)``).
DRY_RUN_SWITCHES = {
    "dry_run": "attach to or start Ray, print the plan (workers, GPU shares, nodes, what runs at once, what the "
               "autoscaler would be asked for) and exit: nothing runs, nothing is written into RUN, nothing is asked for",
    "json": "with --dry-run: the plan as one JSON object on stdout",
}

# stage name -> (module, one-line purpose); a module provides ``cli(argv) -> int``.
STAGES = {
    "prepare": ("jobs.prepare", "decode an image source into Parquet train/val/test splits"),
    "train": ("jobs.train", "fine-tune backbones with a triplet loss on Ray Train"),
    "tune": ("jobs.tune", "search triplet margin, learning rate (and more) with Ray Tune; writes best.json"),
    "evaluate": ("jobs.evaluate", "embed with every model on Ray Data; retrieval, probes, clusters, stacking, report"),
    "search": ("jobs.search", "nearest train images of image files or test ids, from the saved index"),
    "serve": ("jobs.serve", "browse a run and search it over HTTP: a Ray Serve app and a page"),
    "pipeline": ("jobs.pipeline", "prepare, (tune,) train and evaluate under one RUN; reruns resume"),
    "compare": ("jobs.compare", "metrics of evaluated runs side by side; --fail-on-drop gates a regression"),
    "benchmark": ("jobs.benchmark", "measure the Ray paths against plain baselines"),
}


def run_job(main: Callable[[C], Any], config_cls: type[C], argv: Sequence[str] | None, prog: str,
            failures: tuple[type[Exception], ...] = (), console: bool = True,
            dry_run: Callable[[C], Any] | None = None) -> int:
    """Parse ``argv`` into ``config_cls`` and run ``main``: a :class:`UserError` becomes one line and exit 2,
    an :class:`EnvironmentProblem` one line and exit 3, a :class:`lib.errors.WorkFailed` or one of ``failures``
    (the work ran but some of it failed) one line and exit 1.

    ``dry_run``: the job's plan (a :class:`lib.planning.JobPlan` of the config), which ``--dry-run`` prints instead of
    running ``main`` (``--json``: its ``document()`` as one JSON object on stdout); the log then stays out of RUN.

    ``console``: when run from the command line (:func:`command_line`), route the terminal for a Ray job
    (:func:`lib.console.start`): Ray's own routine lines (:func:`onray.ray_lines.routine_ray_line`) go to the job's
    log file, ``RUN/logs/`` when the job has a ``run_dir`` (the temporary folder otherwise), unless ``--verbose``. Called as a function (tests, notebooks),
    the process's stderr is left alone.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if console and _command_line and not {"-h", "--help"} & set(argv):
        lib_console.start(prog.removeprefix("jobs."), None,
                          verbose="--verbose" in argv or bool(os.environ.get("CIFAR_EMBED_VERBOSE")),
                          log_only=routine_ray_line)
    try:
        config, switches = parse_job_command_line(config_cls, argv, prog=prog,
                                                  modes=DRY_RUN_SWITCHES if dry_run else None)
        if switches.get("json") and not switches.get("dry_run"):
            raise UserError("--json goes with --dry-run (the plan as JSON)")
        if dry_run and switches.get("dry_run"):
            plan = dry_run(config)
            print(json.dumps(plan.document()) if switches.get("json") else plan.text(), end="\n" if switches.get(
                "json") else "", flush=True)
            return 0
        if getattr(config, "run_dir", None):
            lib_console.use_log_dir(RunPaths.of(config.run_dir).logs)
        main(config)
    except UserError as err:
        lib_console.error(f"{prog}: error: {err}")
        return EXIT_USER_ERROR
    except (WorkFailed, *failures) as err:
        lib_console.error(f"{prog}: {err}")
        return 1
    except EnvironmentProblem as err:
        lib_console.error(f"{prog}: environment error: {err}")
        return EXIT_ENVIRONMENT
    except OSError as err:
        disk = disk_error(err)
        if disk is None:
            raise
        lib_console.error(f"{prog}: error: {disk}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        lib_console.error(f"{prog}: interrupted")
        return 130
    return 0


def command_line(cli: Callable[[], int]) -> int:
    """Run a job's ``cli`` as the process's command (``python -m jobs.X``, ``cifar-embed X``): the one place
    that lets :func:`run_job` take over the terminal."""
    global _command_line
    _command_line = True
    return cli()


_command_line = False


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
    return command_line(lambda: module.cli(rest))


if __name__ == "__main__":
    sys.exit(main())
