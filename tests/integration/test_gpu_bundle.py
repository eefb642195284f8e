"""The offline GPU check rehearsed on this machine: tools/gpu_bundle.sh builds the bundle (for this machine's Python,
the fastest xz level and a few images per class), and tools/gpu_check.sh installs it with no package index into a
fresh interpreter that has only the GPU image's packages (tools/gpu_image_packages.txt, linked from this
environment) and no ../shared, then runs to its "no CUDA" line (this machine has no GPU).

Needs the package index to build the bundle (pip's cache answers when the wheels were installed here)."""

import json
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = (REPO / "tools" / "gpu_image_packages.txt").read_text().splitlines()
    return {canonical(line) for line in lines if line.strip() and not line.startswith("#")}


def link_image_stand_in(folder: Path) -> list[str]:
    """Links in ``folder`` to the top-level modules and metadata of every distribution installed here that the GPU
    image also has: what a fresh interpreter on that machine would import without the bundle."""
    folder.mkdir()
    wanted, linked = image_packages(), []
    for dist in metadata.distributions():
        if canonical(dist.metadata["Name"]) not in wanted or not dist.files:
            continue
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith("..")}:
            if (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
        linked.append(dist.metadata["Name"])
    return linked


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "gpu-bundle"
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_bundle.sh"), str(out), "--python-version", PYTHON_VERSION,
                           "--xz-level", "0", "--train-per-class", "3", "--test-per-class", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    if done.returncode != 0 and "could not download" in done.stderr:
        pytest.skip(f"no package index here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"gpu_bundle: {out} is ") and "MiB of 60" in done.stdout
    return out


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> Path:
    """A fresh interpreter (a venv without pip or this environment's packages) that sees the image's packages only."""
    root = tmp_path_factory.mktemp("image")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    linked = link_image_stand_in(root / "packages")
    assert {"torch", "numpy", "pyarrow"} <= {canonical(n) for n in linked}
    site = next((root / "venv" / "lib").glob("python3*/site-packages"))
    (site / "gpu-image.pth").write_text(str(root / "packages") + "\n")
    return root / "venv" / "bin" / "python"


def test_the_bundle_fits_the_device_tool_and_says_what_it_holds(bundle):
    record = json.loads((bundle / "bundle.json").read_text())
    total = sum(p.stat().st_size for p in bundle.iterdir())
    assert total <= 60 * 2 ** 20
    assert record["python"] == PYTHON_VERSION
    names = {canonical(p.split()[0]) for p in record["packages"]}
    assert {"ray", "faiss-cpu", "pytorch-metric-learning", "opentsne"} <= names
    assert not names & {"torch", "torchvision", "numpy"}  # the image's own, never bundled
    assert record["subset"]["train"] and all(n == 3 for n in record["subset"]["train"].values())
    with tarfile.open(bundle / "site.tar.xz", "r:xz") as tar:
        members = tar.getnames()
    assert "ray/_raylet.so" in members and not any(m.startswith(("ray/jars", "ray/rllib")) for m in members)


def test_without_the_bundle_the_image_cannot_run_the_jobs(image_python):
    done = subprocess.run([str(image_python), "-c", "import torch, numpy\nimport ray"], capture_output=True,
                          text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 1 and "No module named 'ray'" in done.stderr


def test_the_check_installs_the_bundle_offline_and_stops_at_no_cuda(bundle, image_python, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU'\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CIFAR10_DIR", "VIRTUAL_ENV")}
    env.update(PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", BUNDLE=str(bundle), IMAGE_PYTHON=str(image_python),
               OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), VENV=str(tmp_path / "no-venv"),
               PIP_NO_INDEX="1")
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=600, env=env)
    steps = (tmp_path / "out" / "steps.txt").read_text()
    assert done.returncode == 3, steps + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("no CUDA: torch ")
    assert "DONE install: exit 0" in steps and "DONE imports: exit 0" in steps
    assert not (tmp_path / "no-venv").exists()  # nothing was pip-installed
    assert (tmp_path / "work" / "offline" / "cifar10" / "train").is_dir()
    assert "\n# GPU check: Fake GPU\n" in done.stdout  # SUMMARY.md, printed after the step lines
    out_files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(out_files) <= 8 and (tmp_path / "out" / "SUMMARY.md").is_file()
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        assert "logs/imports.log" in tar.getnames()
