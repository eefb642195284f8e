"""Fine-tune backbones with a metric-learning loss (``--loss``, lib.losses): Ray Data streams augmented
images into Ray Train.

    python -m jobs.train --data-dir DATA --run-dir RUN --backbones resnet50,densenet121,vgg16 [--preset quick]

Each backbone is its own ``TorchTrainer`` on its own workers; several run at once when the cluster
has room (GPU boxes queue them for GPUs). One backbone failing does not stop the others; the job
then ends with exit code 1 and names it. Rerunning the same RUN resumes unfinished backbones from
their last checkpoint and skips finished ones. The work is :func:`onray.trainer.train_backbones`.
"""

from __future__ import annotations

import json
import sys

from jobs.cli import command_line, run_job
from lib.paths import RunPaths
from lib.training import METRIC, TrainConfig


def main(cfg: TrainConfig) -> None:
    from onray.trainer import BackboneFailed, train_backbones  # here: --help answers without importing Ray

    try:
        train_backbones(cfg)
    except BackboneFailed:
        print_table(cfg)  # the backbones that finished, and which did not
        raise
    print_table(cfg)


def print_table(cfg: TrainConfig) -> None:
    print("| backbone | epochs | val mAP@5 untrained | val mAP@5 best | val P@5 untrained | val P@5 best | minutes |")
    print("|---|---|---|---|---|---|---|")
    run = RunPaths.of(cfg.run_dir)
    for backbone in cfg.backbones:
        path = run.model(backbone) / "summary.json"
        if not path.is_file():
            print(f"| {backbone} | failed | | | | | |")
            continue
        s = json.loads(path.read_text())
        print(f"| {backbone} | {s['epochs_run']} | {s['untrained'][METRIC]:.3f} | {s['best'][METRIC]:.3f} | "
              f"{s['untrained']['val_p@5']:.3f} | {s['best']['val_p@5']:.3f} | {s['train_seconds'] / 60:.1f} |")


def plan(cfg: TrainConfig):
    """The training plan that ``--dry-run`` prints."""
    from onray.trainer import dry_run

    return dry_run(cfg)


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, TrainConfig, argv, prog="jobs.train", dry_run=plan)


if __name__ == "__main__":
    sys.exit(command_line(cli))
