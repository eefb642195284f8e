"""Whether a stage runs on GPUs: one rule for training, embedding and faiss."""

from __future__ import annotations

from typing import Literal

from lib.errors import UserError

UseGpu = Literal["auto", "true", "false"]
USE_GPU_HELP = "auto uses GPUs when there are some; true insists on them; false never uses them"


def resolve_use_gpu(use_gpu: str | bool, gpus: int, where: str, hint: str = "") -> bool:
    """``auto`` -> True when ``gpus`` > 0; ``true`` insists (a :class:`UserError` naming ``where`` when there
    are none); ``false`` never. ``gpus`` is what the deciding party sees: the Ray cluster's GPU count for
    training and embedding, faiss's for the index."""
    choice = str(use_gpu).lower()
    if choice not in ("auto", "true", "false"):
        raise UserError(f"--use-gpu must be auto, true or false, got {use_gpu!r}")
    if choice == "false":
        return False
    if choice == "true" and gpus <= 0:
        raise UserError(f"--use-gpu true, but {where} has no GPUs ({hint + '; ' if hint else ''}"
                        f"use --use-gpu auto or false)")
    return gpus > 0
