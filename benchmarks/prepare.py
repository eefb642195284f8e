"""The prepare suite: ``python -m jobs.prepare`` in a fresh process (Ray start included) against a plain
single-process PIL decode loop over the same files.

The job runs as a subprocess, as a user runs it, so its wall time includes starting Ray; the manifest's
decode+write seconds (:func:`onray.prepare.prepare_data`'s timing) leave that out. Both are reported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BenchmarkConfig, significant
from lib.console import log
from lib.data.reader import PreparedData
from lib.errors import UserError
from lib.sources import ListOptions, parse_source
from lib.sources.imagefolder import ImageFolderSource


def plain_pil_decode(paths: list[str]) -> float:
    """Seconds for one process to decode ``paths`` to RGB arrays with PIL (the baseline loop)."""
    from PIL import Image

    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB"))
    return time.perf_counter() - started


def run(cfg: BenchmarkConfig, work: Path) -> dict:
    source = parse_source(cfg.source)
    if not isinstance(source, ImageFolderSource) or source.location.is_uri:
        raise UserError("the prepare suite needs --source imagefolder:PATH with a local PATH")
    listing = source.list_images(ListOptions(cache_dir=work))
    n = len(listing)
    log(f"prepare suite: {n} images; plain PIL loop ...")
    pil_seconds = plain_pil_decode(listing.files)  # local paths: the source is a local folder
    data_dir = Path(tempfile.mkdtemp(dir=work, prefix="prepare-fresh-"))  # never a prepared DATA
    log("prepare suite: python -m jobs.prepare in a fresh process (Ray start included) ...")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--source", cfg.source, "--data-dir", str(data_dir)],
                   check=True, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    wall = time.perf_counter() - started
    data = PreparedData.find(data_dir)
    if data is None:
        raise RuntimeError("jobs.prepare finished without a complete manifest")
    decode = data.manifest["timing"]["decode_write_seconds"]
    return {
        "images": n,
        "plain_pil_seconds": significant(pil_seconds), "plain_pil_images_per_s": round(n / pil_seconds),
        "prepare_wall_seconds": significant(wall), "prepare_images_per_s_wall": round(n / wall),
        "prepare_decode_write_seconds": decode, "prepare_images_per_s_decode_write": round(n / decode),
        "ratio_wall": significant(pil_seconds / wall), "ratio_decode_write": significant(pil_seconds / decode),
    }


def summary(r: dict) -> str:
    return (f"{r['images']} images in {r['prepare_wall_seconds']} s wall (Ray start included); "
            f"{r['prepare_images_per_s_wall']:,}/s wall and {r['prepare_images_per_s_decode_write']:,}"
            f"/s decode+write vs plain PIL loop {r['plain_pil_images_per_s']:,}/s -> "
            f"{r['ratio_wall']}x wall, {r['ratio_decode_write']}x decode+write")
