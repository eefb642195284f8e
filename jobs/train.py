"""Fine-tune backbones with a triplet loss: Ray Data streams augmented images into Ray Train.

    python -m jobs.train --data-dir DATA --run-dir RUN --backbones resnet50,densenet121,vgg16 [--preset quick]

Each backbone is its own ``TorchTrainer`` on its own workers; several run at once when the cluster
has room (GPU boxes queue them for GPUs). One backbone failing does not stop the others; the job
then ends with exit code 1 and names it. Rerunning the same RUN resumes unfinished backbones from
their last checkpoint and skips finished ones.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import ray

from jobs.runtime import init_ray, log, run_job
from jobs.trainer import finished, fit_backbone, model_dir
from lib.backbones import build_model, fetch_imagenet_weights
from lib.dataset import read_manifest
from lib.errors import UserError
from lib.io import ensure_writable_dir
from lib.training import METRIC, TrainConfig

# CPUs left for Ray Data's read and augmentation tasks beside the training workers.
DATA_CPUS = 1


class BackboneFailed(Exception):
    """A backbone's training failed; the others' results stand."""


@ray.remote(num_cpus=0)
def _fit_remote(config: dict, use_gpu: bool, num_classes: int, trainers_per_node: int) -> dict[str, Any]:
    from lib.config import from_dict

    return fit_backbone(from_dict(TrainConfig, config), use_gpu, num_classes, trainers_per_node)


def check_weights(cfg: TrainConfig) -> None:
    """Fail before any cluster work when weights cannot be had (offline) or do not fit."""
    for backbone in cfg.backbones:
        if cfg.weights == "imagenet":
            fetch_imagenet_weights(backbone)
        elif cfg.weights != "none":
            build_model(backbone, cfg.weights, cfg.embedding_dim)


def plan(cfg: TrainConfig) -> tuple[TrainConfig, bool, int]:
    """Resolve GPU use, workers per backbone and how many backbones may train at once."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if cfg.use_gpu == "true" and gpus == 0:
        raise UserError("--use-gpu true, but the Ray cluster has no GPUs (use auto or false)")
    use_gpu = gpus > 0 and cfg.use_gpu != "false"
    workers = cfg.num_workers or (max(1, gpus // len(cfg.backbones)) if use_gpu else 1)
    if use_gpu and workers > gpus:
        raise UserError(f"--num-workers {workers} needs {workers} GPUs; the cluster has {gpus}")
    if workers + DATA_CPUS > cpus:
        raise UserError(f"--num-workers {workers} needs {workers + DATA_CPUS} CPUs with Ray Data's share; "
                        f"the cluster has {cpus}")
    by_cpu = max(1, (cpus - DATA_CPUS) // workers)
    concurrent = min(by_cpu, gpus // workers) if use_gpu else by_cpu
    return dataclasses.replace(cfg, num_workers=workers), use_gpu, max(1, concurrent)


def main(cfg: TrainConfig) -> Path:
    given = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).expanduser().absolute()),
                                data_dir=str(Path(cfg.data_dir).expanduser().absolute()))
    cfg = given.resolve()
    manifest = read_manifest(cfg.data_dir)
    models = ensure_writable_dir(Path(cfg.run_dir) / "models")
    check_weights(cfg)
    init_ray()
    cfg, use_gpu, concurrent = plan(cfg)
    # each backbone resolves on its own: a preset may size epochs per backbone (BACKBONE_PRESETS)
    configs = {bb: dataclasses.replace(given.for_backbone(bb).resolve(), num_workers=cfg.num_workers)
               for bb in cfg.backbones}
    todo = [bb for bb in cfg.backbones if not finished(configs[bb])]
    for done in sorted(set(cfg.backbones) - set(todo)):
        log(f"{done}: already trained with this config ({model_dir(configs[done])}); skipping")
    log(f"training {', '.join(f'{bb} ({configs[bb].epochs} epochs)' for bb in todo) or 'nothing'} on "
        f"{cfg.num_workers} {'GPU' if use_gpu else 'CPU'} worker(s) each, up to {concurrent} at a time; "
        f"preset {cfg.preset}, weights {cfg.weights}")

    # A local Ray runs every trainer on this machine: CPU workers split its cores instead of each
    # taking all of them (oversubscribed threads slow everyone down). On a cluster they spread out.
    trainers_per_node = 1 if use_gpu or os.environ.get("RAY_ADDRESS") else max(1, min(concurrent, len(todo)))
    pending, running, failures = list(todo), {}, {}
    while pending or running:
        while pending and len(running) < concurrent:
            backbone = pending.pop(0)
            ref = _fit_remote.remote(dataclasses.asdict(configs[backbone]), use_gpu,
                                     len(manifest["classes"]), trainers_per_node)
            running[ref] = backbone
        ready, _ = ray.wait(list(running), num_returns=1)
        backbone = running.pop(ready[0])
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None) or err
            if isinstance(cause, UserError):
                raise cause from None
            failures[backbone] = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            log(f"{backbone}: FAILED - {failures[backbone]}")
            traceback.print_exception(cause, file=sys.stderr, limit=-3)

    print_table(cfg)
    if failures:
        raise BackboneFailed("; ".join(f"{bb}: {why}" for bb, why in failures.items()))
    return models


def print_table(cfg: TrainConfig) -> None:
    import json

    print("| backbone | epochs | val mAP@5 untrained | val mAP@5 best | val P@5 untrained | val P@5 best | minutes |")
    print("|---|---|---|---|---|---|---|")
    for backbone in cfg.backbones:
        path = model_dir(cfg.for_backbone(backbone)) / "summary.json"
        if not path.is_file():
            print(f"| {backbone} | failed | | | | | |")
            continue
        s = json.loads(path.read_text())
        print(f"| {backbone} | {s['epochs_run']} | {s['untrained'][METRIC]:.3f} | {s['best'][METRIC]:.3f} | "
              f"{s['untrained']['val_p@5']:.3f} | {s['best']['val_p@5']:.3f} | {s['train_seconds'] / 60:.1f} |")


def cli(argv: list[str] | None = None) -> int:
    try:
        return run_job(main, TrainConfig, argv, prog="jobs.train")
    except BackboneFailed as err:
        print(f"jobs.train: some backbones failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
