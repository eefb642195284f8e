"""Live progress of Ray Train workers on the driver's terminal: one bar per backbone.

Rank 0 of each trainer sends its position (epoch, step, images) to a :class:`ProgressBoard` actor about once a
second, without waiting for an answer; the driver polls the board while it waits for the trainers and moves one
:class:`lib.console.Progress` per backbone (a tqdm bar on a terminal, a plain line every 30 s otherwise).
"""

from __future__ import annotations

import time
from typing import Any

import ray

from lib.console import Progress

# How often a worker sends its position (it never waits for the board).
REPORT_EVERY_S = 1.0


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest position of every trainer, by name."""

    def __init__(self) -> None:
        self.positions: dict[str, dict[str, Any]] = {}

    def report(self, name: str, position: dict[str, Any]) -> None:
        self.positions[name] = position

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.positions


class StepReporter:
    """Worker side: ``step(epoch, step)`` sends at most one report per :data:`REPORT_EVERY_S` to the board."""

    def __init__(self, board, name: str, epochs: int, steps_per_epoch: int, images_per_step: int) -> None:
        self.board, self.name = board, name
        self.epochs, self.steps, self.images_per_step = epochs, steps_per_epoch, images_per_step
        self.last = 0.0

    def step(self, epoch: int, step: int, force: bool = False) -> None:
        if self.board is None or (not force and time.monotonic() - self.last < REPORT_EVERY_S):
            return
        self.last = time.monotonic()
        self.board.report.remote(self.name, {"epoch": epoch, "epochs": self.epochs, "step": step,
                                             "steps": self.steps, "images_per_step": self.images_per_step})


class TrainingBars:
    """Driver side: one bar per backbone, in the order given, counting images over all epochs."""

    def __init__(self, names: list[str]) -> None:
        self.board = ProgressBoard.remote()
        self.order = list(names)
        self.bars: dict[str, Progress] = {}

    def poll(self, timeout: float = 5.0) -> None:
        try:
            positions = ray.get(self.board.snapshot.remote(), timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
            return  # a slow or lost board costs a bar update, never the training
        for name, at in positions.items():
            total = at["epochs"] * at["steps"] * at["images_per_step"]
            done = min(total, ((at["epoch"] - 1) * at["steps"] + at["step"]) * at["images_per_step"])
            desc = f"{name} epoch {at['epoch']}/{at['epochs']}"
            if name not in self.bars:
                position = self.order.index(name) if name in self.order else len(self.bars)
                self.bars[name] = Progress(total, desc, unit="img", position=position, initial=done)
            bar = self.bars[name]
            bar.describe(desc)
            bar.update(done)

    def close(self, name: str | None = None) -> None:
        """Close ``name``'s bar (its trainer ended), or every bar."""
        for key in [name] if name else list(self.bars):
            bar = self.bars.pop(key, None)
            if bar is not None:
                bar.close()
