"""tools/gpu_check.sh on a machine without a usable GPU: one "no CUDA" line and exit 3, before it installs
anything (its GPU steps can only run on a GPU machine)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.sh"


def run_check(tmp_path, *args, fake_smi: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "VENV": sys.prefix}
    if fake_smi is not None:  # a stand-in nvidia-smi first on PATH
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{fake_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_a_machine_whose_nvidia_smi_finds_no_gpu_stops_with_one_line(tmp_path):
    done = run_check(tmp_path, fake_smi='echo "NVIDIA-SMI has failed" >&2; exit 9')
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("no CUDA: nvidia-smi lists no GPU")
    assert not (tmp_path / "out").exists()  # nothing installed, nothing written


def test_a_gpu_that_torch_cannot_use_is_no_cuda_too(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's torch can use a GPU")
    # nvidia-smi answers, but this environment's torch has no usable CUDA
    done = run_check(tmp_path, "--probe-only", fake_smi='echo "Fake GPU"')
    assert done.returncode == 3 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("no CUDA: torch ") and "cannot use the GPU" in done.stderr


def test_the_probe_on_this_machine(tmp_path):
    import shutil

    import torch

    done = run_check(tmp_path, "--probe-only")
    if shutil.which("nvidia-smi") and torch.cuda.is_available():
        assert done.returncode == 0 and done.stdout.startswith("CUDA: ")
    else:
        assert done.returncode == 3 and done.stderr.startswith("no CUDA: ")
