"""What this machine offers a stage: whether it runs on GPUs (one rule for training, embedding and faiss), and
how many CPUs this process may use."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from lib.errors import UserError

# --use-gpu's values; the functions that take one also take a bool (True = "true", False = "false").
UseGpu = Literal["auto", "true", "false"]
USE_GPU_HELP = "auto uses GPUs when there are some; true insists on them; false never uses them"


def resolve_use_gpu(use_gpu: UseGpu | bool, gpus: int, where: str, hint: str = "") -> bool:
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


def gpu_share(gpus_per_worker: str) -> float | None:
    """``--gpus-per-worker``: None for ``auto``, else the number, which must lie in (0, 1]."""
    if str(gpus_per_worker).lower() == "auto":
        return None
    try:
        share = float(gpus_per_worker)
    except ValueError:
        share = -1.0
    if not 0.0 < share <= 1.0:
        raise UserError(f"--gpus-per-worker must be auto or a number in (0, 1], got {gpus_per_worker!r}")
    return share


def cgroup_cpu_limit(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``quota / period``), or None when unlimited or unknown.

    Reads cgroup v2's ``cpu.max`` (``"max 100000"`` or ``"200000 100000"``) or v1's ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (quota -1 = unlimited) under ``cgroup_root``, as a container sees its own cgroup.
    """
    root = Path(cgroup_root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def available_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask (``taskset``, cpusets), capped by its cgroup's CPU quota
    (a container limited to 16 of a host's 192 cores gets 16, where ``os.cpu_count()`` says 192)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def cuda_unusable_reason() -> str:
    """Why torch cannot use the GPU this process was given: its CUDA build against the driver, in one line.
    Raised by GPU workers and actors instead of falling back to the CPU."""
    import torch

    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda else \
        f"torch {torch.__version__} is a CPU-only build"
    return (f"torch cannot use the GPU Ray gave this process ({build}; a CUDA 13 build needs an NVIDIA driver "
            f">= 580): install the torch build that matches the GPU nodes' driver (README, Install)")
