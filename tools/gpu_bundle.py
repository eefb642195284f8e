"""Build the offline bundle that tools/gpu_check.sh installs on a GPU machine without a package index.

    python tools/gpu_bundle.py DIR [--python-version 3.12] [--cifar10-dir PATH] [--train-per-class 500]

DIR (git-ignored; ``.gpu-bundle`` by convention) receives:

- ``site.tar.xz``: an install tree of what the GPU image lacks (Ray, faiss-cpu, pytorch-metric-learning, openTSNE
  and the few libraries those need that the image does not have), for CPython ``--python-version`` on x86-64
  Linux, at the versions installed where this runs (the versions the suite was tested with). Ray is trimmed of
  what the jobs never load (its Java jars, RLlib, Ray LLM, its tests) and its native libraries are stripped of
  symbols: the Ray wheel alone is 79 MB; the whole tree, xz-compressed, is 40.4 MiB for Python 3.12
  (the whole bundle with the default subset: 44.0 MiB).
- ``cifar10-subset.tar.xz``: TRAIN per class of the CIFAR-10 image-folder copy's train split and TEST per class of
  its test split, as the JPEG files they are (a folder ``jobs.prepare --source imagefolder:`` reads; xz takes
  away the tar's 512-byte padding of each 1 KB file).
- ``bundle.json``: the Python version, every package and version in the tree, the subset's counts, the sizes.

The whole folder must stay under :data:`MAX_BYTES` (60 MiB), because the device tool carries at most 64 MiB of
working tree per call; the build fails with one line if it does not. Nothing in the bundle is executed on the
build machine, and the check on the GPU machine extracts it with tarfile's ``data`` filter (no links out of the
target, no device files).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

MAX_BYTES = 60 * 2 ** 20
# What the GPU image lacks (read off its package list, tools/gpu_image_packages.txt), with what those need and
# the image also lacks. pydantic: Ray Train's state schema; jsonschema: Ray's runtime-env checks; tensorboardX:
# Ray Tune's default loggers.
BUNDLED = ("ray", "faiss-cpu", "pytorch-metric-learning", "openTSNE", "pydantic", "pydantic-core",
           "annotated-types", "typing-inspection", "jsonschema", "jsonschema-specifications", "referencing",
           "rpds-py", "tensorboardX")
# Parts of Ray the jobs never import: its Java jars, RLlib, Ray LLM, its tests and its C++ API headers.
RAY_UNUSED = ("ray/jars", "ray/rllib", "ray/llm", "ray/tests", "ray/cpp", "ray/_private/runtime_env/agent/thirdparty_files")
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64")


class BundleError(Exception):
    """A build that cannot go on: one line for the user."""


def pinned(name: str) -> str:
    """``name==version`` as installed here (the version the suite ran with), else the bare name."""
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def download_wheels(names: tuple[str, ...], python_version: str, into: Path) -> list[Path]:
    """Binary wheels of ``names`` for CPython ``python_version`` on x86-64 Linux, without their dependencies
    (those are either in :data:`BUNDLED` or already on the GPU image)."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--dest", str(into)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    done = subprocess.run(command + [pinned(name) for name in names], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"pip could not download the wheels for Python {python_version}: {last}")
    return sorted(into.glob("*.whl"))


def unpack(wheel: Path, site: Path) -> str:
    """Unzip ``wheel`` into ``site`` (a wheel is a zip of the install tree); returns its ``name version``."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith("/") or ".." in Path(member).parts:
                raise BundleError(f"{wheel.name} holds a path outside its tree: {member}")
        archive.extractall(site)
    name, version = wheel.name.split("-")[:2]
    return f"{name} {version}"


def trim_ray(site: Path) -> None:
    """Drop the parts of Ray the jobs never load and strip symbols from its native code (the wheel ships
    ``_raylet.so`` unstripped: 44 MB -> 32 MB)."""
    for part in RAY_UNUSED:
        shutil.rmtree(site / part, ignore_errors=True)
    strip = shutil.which("strip")
    if strip is None:
        return
    for path in (site / "ray").rglob("*"):
        if path.is_file() and (path.suffix == ".so" or os.access(path, os.X_OK)) and _is_elf(path):
            subprocess.run([strip, "--strip-unneeded", str(path)], capture_output=True, check=False)


def _is_elf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"\x7fELF"


def write_site_archive(site: Path, out: Path, level: int) -> None:
    """``site`` as ``out`` (tar, xz at ``level``), paths relative to the tree, compiled caches left out."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info

    with lzma.open(out, "wb", preset=level) as packed, tarfile.open(fileobj=packed, mode="w") as tar:
        for child in sorted(site.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)


def write_subset(cifar10_dir: Path, out: Path, train_per_class: int, test_per_class: int, seed: int = 0
                 ) -> dict[str, dict[str, int]]:
    """A seeded per-class subset of the CIFAR-10 image folder (``train/<class>/*``, ``test/<class>/*``) as a tar.xz
    of its JPEG files; returns the counts per split and class."""
    counts: dict[str, dict[str, int]] = {}
    rng = random.Random(seed)
    with tarfile.open(out, "w:xz") as tar:
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            root = cifar10_dir / split
            if not root.is_dir():
                raise BundleError(f"no {split}/ folder in the CIFAR-10 image folder {cifar10_dir}")
            counts[split] = {}
            for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
                files = sorted(p for p in class_dir.iterdir() if p.is_file())
                chosen = sorted(rng.sample(files, min(per_class, len(files))))
                for path in chosen:
                    tar.add(path, arcname=f"cifar10/{split}/{class_dir.name}/{path.name}")
                counts[split][class_dir.name] = len(chosen)
    return counts


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out: Path, python_version: str, cifar10_dir: Path, train_per_class: int, test_per_class: int,
          level: int, max_bytes: int = MAX_BYTES) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as scratch:
        wheels_dir, site = Path(scratch) / "wheels", Path(scratch) / "site"
        wheels_dir.mkdir()
        site.mkdir()
        packages = [unpack(wheel, site) for wheel in download_wheels(BUNDLED, python_version, wheels_dir)]
        trim_ray(site)
        write_site_archive(site, out / "site.tar.xz.part", level)
    (out / "site.tar.xz.part").replace(out / "site.tar.xz")
    counts = write_subset(cifar10_dir, out / "cifar10-subset.tar.xz.part", train_per_class, test_per_class)
    (out / "cifar10-subset.tar.xz.part").replace(out / "cifar10-subset.tar.xz")
    record = {"python": python_version, "platform": "x86_64 Linux (manylinux)", "packages": packages,
              "subset": counts, "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}}
    (out / "bundle.json").write_text(json.dumps(record, indent=1) + "\n")
    record["total_bytes"] = folder_bytes(out)
    if record["total_bytes"] > max_bytes:
        raise BundleError(f"the bundle in {out} is {record['total_bytes'] / 2 ** 20:.1f} MiB, over the "
                          f"{max_bytes / 2 ** 20:.0f} MiB the device tool can carry beside the tree")
    return record


def install(bundle: Path, target: Path) -> list[str]:
    """Extract ``bundle``'s install tree into ``target`` (safely: tarfile's ``data`` filter) and its CIFAR-10
    subset beside it; returns the bundled packages. Used by tools/gpu_check.sh on the GPU machine."""
    record = json.loads((bundle / "bundle.json").read_text())
    if record["python"] != f"{sys.version_info.major}.{sys.version_info.minor}":
        raise BundleError(f"the bundle in {bundle} is for Python {record['python']}, this is "
                          f"{sys.version_info.major}.{sys.version_info.minor}: rebuild it with --python-version")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle / "site.tar.xz", "r:xz") as tar:
        tar.extractall(target / "site", filter="data")
    with tarfile.open(bundle / "cifar10-subset.tar.xz", "r:xz") as tar:
        tar.extractall(target, filter="data")
    return record["packages"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_bundle.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="output folder (git-ignored), e.g. .gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="CPython of the GPU machine (3.12 on the lent one)")
    parser.add_argument("--cifar10-dir", type=Path,
                        default=Path(os.environ.get("CIFAR10_DIR", Path(__file__).resolve().parents[2]
                                                    / "shared" / "datasets" / "cifar10")))
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--xz-level", type=int, default=6, help="xz preset: 6 packs best, 0 is fastest")
    parser.add_argument("--install", type=Path, metavar="TARGET", help="extract DIR into TARGET instead of building")
    args = parser.parse_args(argv)
    try:
        if args.install is not None:
            packages = install(args.dir, args.install)
            print(f"gpu_bundle: installed {len(packages)} packages into {args.install / 'site'}: {', '.join(packages)}")
            return 0
        record = build(args.dir, args.python_version, args.cifar10_dir, args.train_per_class, args.test_per_class,
                       args.xz_level)
    except (BundleError, OSError, tarfile.TarError) as err:
        print(f"gpu_bundle: error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{name} {size / 2 ** 20:.1f} MiB" for name, size in record["files"].items())
    print(f"gpu_bundle: {args.dir} is {record['total_bytes'] / 2 ** 20:.1f} MiB of {MAX_BYTES / 2 ** 20:.0f} ({sizes}); "
          f"Python {record['python']}: {', '.join(record['packages'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

