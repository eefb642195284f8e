"""Compare evaluated runs side by side, and fail on a regression.

    python -m jobs.compare RUN_A RUN_B [...] [--fail-on-drop 0.01] [--out-dir DIR]
    python -m jobs.compare RUN_A1,RUN_A2,RUN_A3 RUN_B1,RUN_B2,RUN_B3 --fail-on-drop 0   # seeds on each side

Prints each model's mAP@5, P@5 and MAP@R under protocols L and G, probe and kNN accuracy and NMI on every side,
with the last side's difference from the one before it; writes ``compare.md`` and ``compare.png`` (mAP@5 L per
model) to ``--out-dir``. With ``--fail-on-drop X`` the job exits 1 when a model of the last side is worse than the
side before it by more than X on a headline metric, or by more than the seed-to-seed spread when both sides hold
several seeds (:mod:`lib.compare`): a gate for CI after a change.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.cli import command_line, run_job
from lib.compare import comparison_figure, comparison_markdown, find_drops, load_side
from lib.config import option
from lib.errors import UserError
from lib.io import ensure_writable_dir, write_text
from lib.plots import save_figure


class Regression(Exception):
    """The last run is worse than the one before it by more than allowed (exit 1)."""


@dataclass(frozen=True)
class CompareConfig:
    """Compare the metrics of evaluated runs (RUN/eval/metrics.json) and gate on a drop."""

    runs: tuple[str, ...] = option(help="runs to compare, earliest first; RUN1,RUN2 = seeds of one setting",
                                   positional=True)
    fail_on_drop: float | None = option(None, help="exit 1 when a model of the last side falls by more than this "
                                                   "(or than the seed spread) on mAP@5 or P@5, L or G")
    out_dir: str = option("compare", help="where compare.md and compare.png go")

    def __post_init__(self) -> None:
        if len(self.runs) < 2:
            raise UserError(f"give at least two runs to compare, got {len(self.runs)}")
        if self.fail_on_drop is not None and not (math.isfinite(self.fail_on_drop) and self.fail_on_drop >= 0):
            raise UserError(f"--fail-on-drop must be a finite number >= 0, got {self.fail_on_drop}")


def main(cfg: CompareConfig) -> None:
    sides = [load_side(spec) for spec in cfg.runs]
    table = comparison_markdown(sides)
    out = Path(cfg.out_dir)
    ensure_writable_dir(out)
    write_text(out / "compare.md", table + "\n")
    save_figure(comparison_figure(sides), out / "compare.png")
    print(table)
    print(f"table:   {out / 'compare.md'}\npicture: {out / 'compare.png'}")
    if cfg.fail_on_drop is None:
        return
    drops = find_drops(sides[-2], sides[-1], cfg.fail_on_drop)
    if drops:
        raise Regression(f"{len(drops)} drop(s) beyond the gate: " + "; ".join(d.describe() for d in drops))
    print(f"gate: no model of {sides[-1].name} fell by more than {cfg.fail_on_drop} (or the seed spread)")


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, CompareConfig, argv, prog="jobs.compare", failures=(Regression,))


if __name__ == "__main__":
    sys.exit(command_line(cli))
