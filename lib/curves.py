"""The training curve figure: train and val loss, and val mAP@5, per epoch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.figure import Figure  # noqa: E402


def plot_loss_curve(history: list[dict[str, Any]], title: str = "") -> Figure:
    """Two panels from per-epoch rows: losses (train from epoch 1, val from epoch 0) and val mAP@5 / P@5.

    Epoch 0 is the untrained network, so the right panel shows what training bought.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    trained = [row for row in history if row.get("train_loss") is not None]
    left.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], "o-", label="train loss")
    left.plot([r["epoch"] for r in history], [r["val_loss"] for r in history], "s--", label="val loss")
    left.set_xlabel("epoch")
    left.set_ylabel("triplet loss")
    left.legend()
    left.grid(alpha=0.3)
    for key, style in (("val_map@5", "o-"), ("val_p@5", "s--")):
        right.plot([r["epoch"] for r in history], [r[key] for r in history], style, label=key)
    right.set_xlabel("epoch (0 = untrained)")
    right.set_ylabel("validation retrieval")
    right.legend()
    right.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    from lib.io import atomic_open

    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)
