"""Prepare a data set: list a source, decode it in parallel on Ray Data, write Parquet per split.

    python -m jobs.prepare --source imagefolder:PATH|cifar10[:PATH] --data-dir DATA

Output: ``DATA/{train,val,test}/part-*.parquet`` and ``DATA/manifest.json`` (see lib.dataset).
Rerunning into a complete DATA does nothing; into a partial one (a crash) it prepares it again.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.runtime import init_ray, log, run_job
from lib import dataset as ds_lib
from lib.config import option, to_dict
from lib.errors import UserError
from lib.io import ensure_writable_dir, replace_dir, staging_dir, write_json
from lib.sources import Listing, Source, list_source, parse_source, stratified_pick

# Images per Ray Data block: one decode task and one Parquet file per block and split.
ROWS_PER_BLOCK = 2500


@dataclass(frozen=True)
class PrepareConfig:
    """Decode a labelled image source into Parquet train/val/test splits for the other jobs."""

    source: str = option(help="cifar10 (download), cifar10:PATH (extracted cifar-10-batches-py or the "
                              ".tar.gz) or imagefolder:PATH (PATH/{train,test}/<class>/* or PATH/<class>/*)")
    data_dir: str = option(help="output folder DATA")
    val_fraction: float = option(0.1, help="share of each class of the source's train split held out as val")
    test_fraction: float = option(0.2, help="share of each class used as test when an image folder has "
                                            "no train/ and test/ folders")
    seed: int = option(0, help="seed of the val (and single-tree test) split")
    skip_bad_images: bool = option(False, help="skip unreadable files (counted and listed in the manifest) "
                                               "instead of stopping")
    cache_dir: str = option("~/.cache/cifar-embeddings", help="where cifar10 downloads and extracts to")

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
        parse_source(self.source)


def identity(cfg: PrepareConfig, source: Source) -> dict:
    """The settings that decide DATA's content (see lib.dataset.IDENTITY_KEYS)."""
    return {"source": str(source), "seed": cfg.seed, "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction, "skip_bad_images": cfg.skip_bad_images}


def check_existing(data_dir: Path, wanted: dict) -> bool:
    """True when DATA already holds this exact data set; raises if it holds another or foreign files."""
    manifest = ds_lib.complete_manifest(data_dir)
    if manifest is not None:
        held = {key: manifest.get(key) for key in ds_lib.IDENTITY_KEYS}
        if held == wanted:
            return True
        diff = ", ".join(f"{k}={held[k]!r} (asked {wanted[k]!r})" for k in wanted if held[k] != wanted[k])
        raise UserError(f"{data_dir} already holds a data set prepared with other settings: {diff}; "
                        f"choose another --data-dir or remove it")
    for split in ds_lib.SPLITS:
        split_dir = data_dir / split
        if split_dir.exists():
            foreign = [p for p in split_dir.iterdir() if not p.name.endswith((".parquet", ".parquet.tmp"))]
            if not split_dir.is_dir() or foreign:
                raise UserError(f"{split_dir} holds files that jobs.prepare did not write; "
                                f"choose another --data-dir")
    return False


def listing_blocks(listing: Listing, splits: np.ndarray) -> list[pa.Table]:
    """The listing as Arrow tables of at most ROWS_PER_BLOCK rows: one Ray Data block (task) each."""
    order = np.argsort(np.asarray([ds_lib.SPLITS.index(s) for s in splits]), kind="stable")
    columns = {"row": np.arange(len(listing)), "id": np.asarray(listing.ids, dtype=object),
               "label": listing.labels, "split": splits}
    if listing.paths is not None:
        columns["path"] = np.asarray(listing.paths, dtype=object)
    blocks = []
    for start in range(0, len(order), ROWS_PER_BLOCK):
        take = order[start:start + ROWS_PER_BLOCK]
        block = {name: pa.array(values[take].tolist() if values.dtype == object else values[take])
                 for name, values in columns.items()}
        if listing.images is not None:
            block["image"] = pa.FixedShapeTensorArray.from_numpy_ndarray(listing.images[take])
        blocks.append(pa.table(block))
    return blocks


def decode_and_write(listing: Listing, splits: np.ndarray, out_dir: Path) -> list[dict]:
    """Run the decode-and-write batch function over the listing on Ray Data; returns the summaries."""
    import ray

    blocks = listing_blocks(listing, splits)
    dataset = ray.data.from_arrow(blocks).map_batches(
        ds_lib.write_shard_batch, batch_size=None, batch_format="numpy", zero_copy_batch=True,
        fn_kwargs={"out_dir": str(out_dir), "image_shape": listing.image_shape, "classes": listing.classes})
    return [json.loads(row["summary"]) for row in dataset.take_all()]


def main(cfg: PrepareConfig) -> Path:
    """Prepare ``cfg.data_dir``; returns it. Idempotent for a complete DATA."""
    started = time.perf_counter()
    source = parse_source(cfg.source)
    created = not Path(cfg.data_dir).expanduser().exists()
    data_dir = ensure_writable_dir(cfg.data_dir)
    try:
        return prepare(cfg, source, data_dir, started)
    except BaseException:
        if created and not any(data_dir.iterdir()):
            data_dir.rmdir()  # leave no trace of a run that wrote nothing
        raise


def prepare(cfg: PrepareConfig, source: Source, data_dir: Path, started: float) -> Path:
    wanted = identity(cfg, source)
    if check_existing(data_dir, wanted):
        log(f"{data_dir} is already prepared from {source}; nothing to do")
        return data_dir

    log(f"listing {source}")
    listing = list_source(source, Path(cfg.cache_dir), cfg.test_fraction, cfg.seed)
    splits = listing.source_split.copy()
    is_train = splits == "train"
    train_ids = [listing.ids[i] for i in np.flatnonzero(is_train)]
    is_val = stratified_pick(train_ids, listing.labels[is_train], cfg.val_fraction, cfg.seed)
    splits[np.flatnonzero(is_train)[is_val]] = "val"
    log(f"{len(listing)} images in {len(listing.classes)} classes ({listing.notes['layout']}), "
        f"stored as {listing.image_shape[0]}x{listing.image_shape[1]} RGB; "
        + ", ".join(f"{s} {int((splits == s).sum())}" for s in ds_lib.SPLITS))

    # A stale manifest must never describe files from this run: remove it before anything moves.
    (data_dir / ds_lib.MANIFEST).unlink(missing_ok=True)
    for leftover in data_dir.glob(".prepare.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    staged = staging_dir(data_dir, "prepare")
    try:
        init_ray()
        decode_started = time.perf_counter()
        merged = ds_lib.merge_summaries(decode_and_write(listing, splits, staged), listing.classes)
        decode_seconds = time.perf_counter() - decode_started
        if merged["bad"] and not cfg.skip_bad_images:
            path, reason = merged["bad"][0]
            more = f" and {len(merged['bad']) - 1} more" if len(merged["bad"]) > 1 else ""
            raise UserError(f"cannot read image {path} ({reason}){more}; "
                            f"use --skip-bad-images to leave such files out")
        empty = [f"{split}/{name}" for split in ds_lib.SPLITS for name, n in merged["counts"][split].items()
                 if n == 0]
        if empty:
            raise UserError(f"after skipping unreadable files these split/class pairs have no images: "
                            f"{', '.join(empty[:5])} (source {source})")
        for split in ds_lib.SPLITS:
            (staged / split).mkdir(exist_ok=True)
            replace_dir(staged / split, data_dir / split)
    finally:
        shutil.rmtree(staged, ignore_errors=True)

    manifest = {
        "format_version": ds_lib.FORMAT_VERSION,
        **wanted,
        "classes": listing.classes,
        "image_shape": list(listing.image_shape),
        "counts": merged["counts"],
        "totals": {split: sum(merged["counts"][split].values()) for split in ds_lib.SPLITS},
        "files": merged["files"],
        "skipped": [{"path": path, "reason": reason} for path, reason in merged["bad"]],
        "converted": merged["converted"],
        "source_notes": listing.notes,
        "config": to_dict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timing": {"decode_write_seconds": round(decode_seconds, 3),
                   "total_seconds": round(time.perf_counter() - started, 3)},
    }
    write_json(data_dir / ds_lib.MANIFEST, manifest)
    rate = len(listing) / decode_seconds
    skipped = f", {len(merged['bad'])} unreadable files skipped" if merged["bad"] else ""
    log(f"wrote {data_dir}: " + ", ".join(f"{s} {manifest['totals'][s]}" for s in ds_lib.SPLITS)
        + f" images{skipped}; decode+write {decode_seconds:.1f} s ({rate:,.0f} images/s), "
          f"total {time.perf_counter() - started:.1f} s")
    return data_dir


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, PrepareConfig, argv, prog="jobs.prepare")


if __name__ == "__main__":
    sys.exit(cli())
