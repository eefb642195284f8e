"""What a finished tune leaves for people and for ``jobs.train``: the trial table, the picture, ``best.json``.

Each trial is one row (a plain dict, no Ray objects): ``trial_id``, the searched keys, ``epochs``
(epochs reported), ``best`` (its highest val mAP@5, ``None`` when it reported none) and ``status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lib.io import atomic_open, write_json
from lib.plots import save_figure
from lib.training import HPARAM_KEYS, METRIC

STATUS_COLOURS = {"completed": (0.12, 0.47, 0.71), "stopped early": (0.60, 0.60, 0.60), "error": (0.85, 0.10, 0.10)}


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest val mAP@5 (ties: the earlier trial); ``None`` when none reported one."""
    scored = [row for row in rows if row["best"] is not None]
    return max(scored, key=lambda row: row["best"]) if scored else None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def trials_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str], title: str) -> str:
    """A Markdown table of every trial, best first marked; mAP@5 to four decimals."""
    best = best_row(rows)
    lines = [f"# {title}", "", f"| trial | {' | '.join(keys)} | epochs | best {METRIC} | status |",
             "|---|" + "---|" * (len(keys) + 3)]
    for row in rows:
        mark = " (best)" if best is not None and row is best else ""
        score = "" if row["best"] is None else f"{row['best']:.4f}"
        cells = [row["trial_id"] + mark, *(_cell(row.get(key)) for key in keys), str(row["epochs"]), score,
                 row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tune_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """val mAP@5 of every trial against its margin and (log x) its learning rate, coloured by status."""
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    figure.suptitle(title)
    scored = [row for row in rows if row["best"] is not None]
    best = best_row(rows)
    for axes, key, log_x in zip(figure.subplots(1, 2, sharey=True), ("margin", "lr"), (False, True), strict=True):
        for status, colour in STATUS_COLOURS.items():
            points = [(row[key], row["best"]) for row in scored if row["status"] == status]
            if points:
                x, y = np.asarray(points, dtype=float).T
                axes.scatter(x, y, s=36, color=colour, label=f"{status} ({len(points)})", alpha=0.85)
        if best is not None:
            axes.scatter([best[key]], [best["best"]], s=160, facecolors="none", edgecolors="black",
                         linewidths=1.5, label="best")
        if log_x:
            axes.set_xscale("log")
        axes.set_xlabel("learning rate" if key == "lr" else "triplet margin")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel(f"best {METRIC} (validation)")
    figure.axes[0].legend(fontsize=8, loc="best")
    return figure


def best_document(best: dict[str, Any], backbone: str, preset: str) -> dict[str, Any]:
    """``best.json``: the best trial's hyper-parameters (``HPARAM_KEYS``), its val mAP@5, backbone, preset.

    Exactly what :func:`lib.training.load_hparams` reads for ``jobs.train --hparams``.
    """
    return {**{key: best[key] for key in HPARAM_KEYS}, METRIC: best["best"], "backbone": backbone, "preset": preset}


def write_report(out: Path, rows: Sequence[dict[str, Any]], keys: Sequence[str], backbone: str,
                 preset: str) -> dict[str, Any]:
    """Write ``trials.md``, ``tune.png`` and, last, ``best.json`` into ``out``; returns best.json's content."""
    best = best_row(rows)
    title = f"Tune {backbone} ({preset}): {len(rows)} trials, best {METRIC} {best['best']:.4f}"
    with atomic_open(out / "trials.md", "w", encoding="utf-8") as handle:
        handle.write(trials_markdown(rows, keys, title))
    save_figure(tune_figure(rows, title), out / "tune.png")
    document = best_document(best, backbone, preset)
    write_json(out / "best.json", document)
    return document
