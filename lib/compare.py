"""Comparing evaluated runs: the metrics of each model side by side, their differences, and a regression gate.

A *side* is one run, or several runs of the same settings with different seeds (``RUN_A1,RUN_A2``); a side's value
of a metric is the mean over its runs, and with two or more runs its spread is their sample standard deviation.
The later side (the last one) is compared with the earlier side before it, model by model, over the models both
evaluated. A drop is ``earlier - later`` of a metric where higher is better (every metric here).

The gate (``jobs.compare --fail-on-drop X``) fails on a model whose drop exceeds ``X`` or, when both sides hold
several seeds, the larger of ``X`` and the seed-to-seed spread (the larger of the two sides' standard deviations):
a change inside the noise of the seeds is not a regression.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from lib.errors import UserError
from lib.paths import RunPaths

# (label, path into a metrics.json model entry or its clusters entry): what a comparison shows, in order
METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mAP@5 L", ("models", "L", "map@5")),
    ("P@5 L", ("models", "L", "p@5")),
    ("MAP@R L", ("models", "L", "map@r")),
    ("mAP@5 G", ("models", "G", "map@5")),
    ("P@5 G", ("models", "G", "p@5")),
    ("MAP@R G", ("models", "G", "map@r")),
    ("probe test acc", ("models", "test_acc")),
    ("kNN acc", ("models", "knn_acc")),
    ("NMI", ("clusters", "nmi")),
)
# The metrics the gate reads: the headline retrieval figures of both protocols.
GATED = ("mAP@5 L", "P@5 L", "mAP@5 G", "P@5 G")


@dataclass(frozen=True)
class Side:
    """One side of a comparison: ``runs`` (one, or several seeds) and, per model and metric label, their values."""

    name: str
    runs: tuple[str, ...]
    values: dict[str, dict[str, list[float]]]

    def mean(self, model: str, metric: str) -> float:
        return statistics.fmean(self.values[model][metric])

    def spread(self, model: str, metric: str) -> float | None:
        """Sample standard deviation over the side's seeds; None with one run."""
        values = self.values[model][metric]
        return statistics.stdev(values) if len(values) >= 2 else None


@dataclass(frozen=True)
class Drop:
    """A model of the later side worse than the earlier side by ``amount`` on ``metric``, above ``allowed``."""

    model: str
    metric: str
    earlier: float
    later: float
    allowed: float

    @property
    def amount(self) -> float:
        return self.earlier - self.later

    def describe(self) -> str:
        return (f"{self.model} {self.metric} fell {self.earlier:.3f} -> {self.later:.3f} "
                f"(-{self.amount:.3f}, allowed {self.allowed:.3f})")


def read_metrics(run_dir: str) -> dict:
    """``RUN/eval/metrics.json`` of ``run_dir``; a missing or unreadable one is one :class:`UserError`."""
    path = RunPaths.of(run_dir).eval / "metrics.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no evaluation in {run_dir}: {path} is missing (run jobs.evaluate)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise UserError(f"{path} has no 'models' table: not a metrics.json of jobs.evaluate")
    return document


def _value(document: dict, model: str, path: tuple[str, ...], where: str) -> float:
    node = document.get(path[0], {}).get(model, {})
    for key in path[1:]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        raise UserError(f"{where}: model {model} has no {'.'.join(path[1:])} (a metrics.json of another version?)")
    return float(node)


def load_side(spec: str) -> Side:
    """A side from ``RUN`` or ``RUN1,RUN2,...`` (seeds of one setting): every model all its runs evaluated."""
    runs = tuple(part.strip() for part in spec.split(",") if part.strip())
    if not runs:
        raise UserError(f"empty run list {spec!r}")
    documents = [read_metrics(run) for run in runs]
    models = [name for name in documents[0]["models"] if all(name in d["models"] for d in documents)]
    if not models:
        raise UserError(f"the runs {', '.join(runs)} have no model in common")
    values = {model: {label: [_value(d, model, path, run) for d, run in zip(documents, runs, strict=True)]
                      for label, path in METRICS} for model in models}
    return Side(name=runs[0] if len(runs) == 1 else f"{runs[0]} (+{len(runs) - 1} seeds)", runs=runs, values=values)


def common_models(sides: Sequence[Side]) -> list[str]:
    """Models every side evaluated, in the first side's order."""
    return [model for model in sides[0].values if all(model in side.values for side in sides[1:])]


def find_drops(earlier: Side, later: Side, threshold: float) -> list[Drop]:
    """Every gated metric of a common model where ``later`` is below ``earlier`` by more than the allowed amount:
    ``threshold``, or the seed-to-seed spread when both sides hold several seeds and it is larger."""
    drops = []
    for model in common_models([earlier, later]):
        for metric in GATED:
            spreads = [s for s in (earlier.spread(model, metric), later.spread(model, metric)) if s is not None]
            allowed = max([threshold, *spreads]) if len(spreads) == 2 else threshold
            before, after = earlier.mean(model, metric), later.mean(model, metric)
            if before - after > allowed:
                drops.append(Drop(model, metric, before, after, allowed))
    return drops


def _cell(side: Side, model: str, metric: str) -> str:
    spread = side.spread(model, metric)
    return f"{side.mean(model, metric):.3f}" + (f" ± {spread:.3f}" if spread is not None else "")


def comparison_markdown(sides: Sequence[Side]) -> str:
    """A table per model: each metric on each side and the last side's difference from the one before it."""
    lines = ["# Run comparison", ""]
    lines += [f"- side {i + 1}: {', '.join(side.runs)}" for i, side in enumerate(sides)]
    lines.append("")
    header = "| metric | " + " | ".join(f"side {i + 1}" for i in range(len(sides))) + " | last - previous |"
    for model in common_models(sides):
        lines += [f"## {model}", "", header, "|---|" + "---|" * (len(sides) + 1)]
        for label, _ in METRICS:
            delta = sides[-1].mean(model, label) - sides[-2].mean(model, label) if len(sides) >= 2 else 0.0
            cells = " | ".join(_cell(side, model, label) for side in sides)
            lines.append(f"| {label} | {cells} | {delta:+.3f} |")
        lines.append("")
    return "\n".join(lines)


def comparison_figure(sides: Sequence[Side], metric: str = "mAP@5 L") -> Figure:
    """Grouped bars of ``metric`` per model, one bar per side (error bars: the seed spread where there is one)."""
    models = common_models(sides)
    figure = Figure(figsize=(max(5.0, 1.2 * len(models) * len(sides) + 2), 4.0))
    axes = figure.add_subplot()
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        means = [side.mean(model, metric) for model in models]
        errors = [side.spread(model, metric) or 0.0 for model in models]
        positions = [m + (i - (len(sides) - 1) / 2) * width for m in range(len(models))]
        axes.bar(positions, means, width, yerr=errors, capsize=3, label=f"side {i + 1}: {Path(side.runs[0]).name}"
                 + (f" (+{len(side.runs) - 1})" if len(side.runs) > 1 else ""))
    axes.set_xticks(range(len(models)), models, rotation=20, ha="right")
    axes.set_ylabel(metric)
    axes.set_ylim(0, 1)
    axes.set_title(f"{metric} per model")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure
