"""``cifar-embed <stage> [flags]``: the console script; each stage is also ``python -m jobs.<stage>``."""

from __future__ import annotations

import importlib
import sys

# stage name -> (module, one-line purpose); a module provides ``cli(argv) -> int``.
STAGES = {
    "prepare": ("jobs.prepare", "decode an image source into Parquet train/val/test splits"),
    "train": ("jobs.train", "fine-tune backbones with a triplet loss on Ray Train"),
    "tune": ("jobs.tune", "search triplet margin, learning rate (and more) with Ray Tune; writes best.json"),
    "evaluate": ("jobs.evaluate", "embed with every model on Ray Data; retrieval, probes, clusters, stacking, report"),
    "search": ("jobs.search", "nearest train images of image files or test ids, from the saved index"),
    "pipeline": ("jobs.pipeline", "prepare, (tune,) train and evaluate under one RUN; reruns resume"),
    "benchmark": ("jobs.benchmark", "measure the Ray paths against plain baselines"),
}


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
