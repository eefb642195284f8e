"""Precision choice: bf16 only where asked for or where the hardware runs it natively, and bf16
embeddings close to float32 ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lib.backbones import build_model
from lib.precision import (
    PRECISIONS,
    cpu_has_native_bf16,
    forward,
    gpu_has_native_bf16,
    prepare_for_bf16,
    uses_bf16,
)


def test_explicit_precision_wins_over_hardware():
    assert uses_bf16("fp32", "cpu") is False
    assert uses_bf16("bf16", "cpu") is True


def test_auto_on_cpu_follows_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    flags = set()
    if cpuinfo.is_file():
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    assert cpu_has_native_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})
    assert uses_bf16("auto", torch.device("cpu")) == cpu_has_native_bf16()


@pytest.mark.parametrize(("capability", "native"), [
    ((6, 0), False), ((7, 0), False), ((7, 5), False),   # P100, V100, T4: bf16 only emulated
    ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((10, 0), True),  # A100, A10/RTX 30, L4, H100/H200, B200
])
def test_auto_takes_bf16_only_on_gpus_that_have_it_in_hardware(capability, native):
    assert gpu_has_native_bf16(capability) is native


def test_auto_on_a_cuda_device_without_usable_cuda_is_float32():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert uses_bf16("auto", "cuda") is False


def test_unknown_precision_is_refused():
    assert PRECISIONS == ("auto", "fp32", "bf16")
    with pytest.raises(ValueError, match="fp16"):
        uses_bf16("fp16", "cpu")


def test_bf16_embeddings_stay_close_to_float32():
    """The same network in bf16 + channels-last gives nearly the same unit vectors and similarities."""
    torch.manual_seed(0)
    model = build_model("resnet50", "none", 32).eval()
    images = torch.randn(64, 3, 32, 32)
    with torch.inference_mode():
        reference = model(images)
        fast = forward(prepare_for_bf16(model, True), images, bf16=True)
    assert fast.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(reference, fast)
    assert cosine.min().item() > 0.99
    # pairwise similarities, what retrieval ranks by, move by a small fraction of their spread
    reference_sims, fast_sims = reference @ reference.T, fast @ fast.T
    assert (reference_sims - fast_sims).abs().max() < 0.1 * (reference_sims.max() - reference_sims.min())
