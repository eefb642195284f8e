"""Numeric precision of forward passes: bf16 autocast + channels-last where the hardware runs bf16 natively.

``auto`` picks bf16 on GPUs that run it natively (compute capability 8.0 and up: A100, H100/H200, L4,
RTX 30xx and later; a T4 or V100 would emulate it slowly, so they run float32) and on CPUs with bf16 matrix
instructions (Intel AMX-BF16 or AVX512-BF16), where oneDNN's bf16 convolutions measured 1.5-3x the float32 images/s for the three
backbones at 32 px (docs/results.md, "bf16 on the CPU"); everywhere else float32. Weights, optimiser state and the loss
stay float32 (autocast), and embeddings leave the model as float32.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
PRECISION_HELP = ("auto: bf16 autocast + channels-last on GPUs with native bf16 (compute capability >= 8.0) and "
                  "on CPUs with native bf16 (AMX/AVX512-BF16), else fp32")
# The first NVIDIA architecture with bf16 tensor cores (Ampere); older GPUs emulate bf16.
NATIVE_BF16_CAPABILITY = (8, 0)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when ``/proc/cpuinfo`` lists a bf16 matrix instruction set (AMX-BF16 or AVX512-BF16); False
    where it cannot be read (non-Linux), so the default there is float32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def gpu_has_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of compute ``capability`` (major, minor) runs bf16 in hardware (8.0 and up)."""
    return tuple(capability) >= NATIVE_BF16_CAPABILITY


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of CUDA ``device``, or None when CUDA is not usable."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def uses_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether forward passes on ``device`` run under bf16 autocast for ``precision`` (auto|fp32|bf16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    device = torch.device(device)
    if device.type == "cuda":
        capability = cuda_capability(device)
        return capability is not None and gpu_has_native_bf16(capability)
    return device.type == "cpu" and cpu_has_native_bf16()


def prepare_for_bf16(model: torch.nn.Module, bf16: bool) -> torch.nn.Module:
    """``model`` in channels-last memory layout when it will run in bf16 (oneDNN and cuDNN's fast path)."""
    return model.to(memory_format=torch.channels_last) if bf16 else model


def forward(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> torch.Tensor:
    """``model(images)`` for (N, 3, S, S) float images, as float32; when ``bf16``, under bf16 autocast on the
    images' device with channels-last input (to match :func:`prepare_for_bf16`'s model)."""
    if not bf16:
        return model(images)
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        return model(images.contiguous(memory_format=torch.channels_last)).float()
