"""``jobs.prepare`` on Ray: list a source in the driver, decode and write Parquet in Ray Data tasks.

Output: ``DATA/{train,val,test}/part-*.parquet`` and ``DATA/manifest.json`` (see :mod:`lib.data`).
The source is any registered kind (:mod:`lib.sources`); its files are read by the decode tasks through the
listing's ``pyarrow.fs`` filesystem object. A source's slow independent reads while listing (an object-storage
folder's class folders, a sample of headers) run as Ray Data tasks too (:func:`map_on_ray_data`).
Rerunning into a complete DATA does nothing; into a partial one (a crash) it prepares it again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lib.console import Progress, detail, log
from lib.data.reader import MANIFEST, SPLITS
from lib.data.writer import merge_summaries, write_manifest, write_shard_batch
from lib.io import ensure_writable_dir, replace_dir, staging_dir
from lib.prepare import (
    PrepareConfig,
    assign_splits,
    check_existing,
    check_written,
    identity,
    manifest_document,
    with_stored_shape,
)
from lib.sources import Listing
from lib.sources.location import file_uri
from onray.runtime import check_cluster_paths, check_shared_storage, init_ray

# Images per Ray Data block: one decode task and one Parquet file per block and split.
ROWS_PER_BLOCK = 2500
# At most this many Ray Data tasks for one listing step (each takes a share of the items).
LISTING_TASKS = 64


def _apply_to_items(batch: dict[str, np.ndarray], *, function: Callable[[Any], Any]) -> dict[str, np.ndarray]:
    """One listing task: ``function`` of each JSON-encoded ``item``, JSON-encoded, beside its ``index``."""
    results = [json.dumps(function(json.loads(item))) for item in batch["item"]]
    return {"index": batch["index"], "result": np.array(results, dtype=object)}


def map_on_ray_data(function: Callable[[Any], Any], items: list) -> list:
    """``[function(item) for item in items]`` in Ray Data tasks (at most :data:`LISTING_TASKS`), in order.

    ``ListOptions.map_each`` for jobs.prepare: starts (or attaches to) Ray on first use. Items and results
    travel as JSON, so both must be JSON-compatible; ``function`` must be picklable.
    """
    if not items:
        return []
    import ray

    init_ray()
    rows = ray.data.from_items([{"index": i, "item": json.dumps(item)} for i, item in enumerate(items)],
                               override_num_blocks=min(len(items), LISTING_TASKS))
    mapped = rows.map_batches(_apply_to_items, batch_size=None, batch_format="numpy",
                              fn_kwargs={"function": function})
    results: list = [None] * len(items)
    progress = Progress(len(items), "list", unit="item")
    for done, row in enumerate(mapped.iter_rows(), start=1):
        results[int(row["index"])] = json.loads(row["result"])
        progress.update(done)
    progress.close()
    return results


def listing_blocks(listing: Listing, splits: np.ndarray) -> list[pa.Table]:
    """The listing as Arrow tables of at most ROWS_PER_BLOCK rows: one Ray Data block (task) each."""
    order = np.argsort(np.asarray([SPLITS.index(s) for s in splits]), kind="stable")
    columns = {"row": np.arange(len(listing)), "id": np.asarray(listing.ids, dtype=object),
               "label": listing.labels, "split": splits}
    if listing.files is not None:
        columns["path"] = np.asarray(listing.files, dtype=object)
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
    """Run the decode-and-write batch function over the listing on Ray Data; returns the summaries.

    Each task opens its files through ``listing.filesystem`` (pickled into the task: a local disk, a bucket).
    """
    import ray

    dataset = ray.data.from_arrow(listing_blocks(listing, splits)).map_batches(
        write_shard_batch, batch_size=None, batch_format="numpy", zero_copy_batch=True,
        fn_kwargs={"out_dir": str(out_dir), "image_shape": listing.image_shape, "classes": listing.classes,
                   "filesystem": listing.filesystem})
    summaries, done = [], 0
    progress = Progress(len(listing), "decode + write")
    for row in dataset.iter_rows():
        summary = json.loads(row["summary"])
        summaries.append(summary)
        done += sum(item["rows"] for item in summary["written"]) + len(summary["bad"])
        progress.update(done)
    progress.close()
    return summaries


def readable_part(listing: Listing, bad: list[list[str]]) -> tuple[Listing, np.ndarray]:
    """The listing without its unreadable files (``bad``: :func:`merge_summaries`'s ``[file, reason]`` pairs),
    and the positions it keeps."""
    unreadable = {name for name, _ in bad}
    keep = np.asarray([file_uri(listing.filesystem, path) not in unreadable for path in listing.files])
    rows = np.flatnonzero(keep)
    return dataclasses.replace(listing, ids=[listing.ids[i] for i in rows], labels=listing.labels[rows],
                               source_split=listing.source_split[rows],
                               files=[listing.files[i] for i in rows]), rows


def _resplit_readable(listing: Listing, splits: np.ndarray, merged: dict, cfg: PrepareConfig, data_dir: Path,
                      staged: Path) -> tuple[Listing, np.ndarray, dict, Path]:
    """With ``--skip-bad-images``: the splits are drawn among the readable files only, so an unreadable file never
    takes a class's val (or train) place. When leaving the unreadable files out moves any pick, the readable
    files are decoded and written again under the new splits (a second pass, only then)."""
    readable, rows = readable_part(listing, merged["bad"])
    redrawn = assign_splits(readable, cfg.val_fraction, cfg.seed)
    if np.array_equal(redrawn, splits[rows]):
        return listing, splits, merged, staged
    log(f"{len(merged['bad'])} unreadable files left out; drawing the splits again among the {len(readable)} "
        f"readable ones and writing them again")
    shutil.rmtree(staged, ignore_errors=True)
    staged = staging_dir(data_dir, "prepare")
    bad = merged["bad"]
    merged = merge_summaries(decode_and_write(readable, redrawn, staged), readable.classes)
    merged["bad"] = sorted(bad + merged["bad"])  # the second pass sees only files the first one read
    return readable, redrawn, merged, staged


def prepare_data(cfg: PrepareConfig) -> Path:
    """Prepare ``cfg.data_dir``; returns it. Idempotent for a complete DATA; a run that wrote nothing
    leaves no folder behind."""
    started = time.perf_counter()
    check_cluster_paths(data_dir=cfg.data_dir)  # a bad --source failed already, when cfg was made
    created = not Path(cfg.data_dir).expanduser().exists()
    data_dir = ensure_writable_dir(cfg.data_dir)
    try:
        return _prepare(cfg, data_dir, started)
    except BaseException:
        if created and not any(data_dir.iterdir()):
            data_dir.rmdir()
        raise


def _prepare(cfg: PrepareConfig, data_dir: Path, started: float) -> Path:
    source = cfg.data_source
    wanted = identity(cfg)
    if check_existing(data_dir, wanted):
        log(f"{data_dir} is already prepared from {source}; nothing to do")
        return data_dir

    detail(f"listing {source}")
    listing = with_stored_shape(cfg, source.list_images(dataclasses.replace(cfg.list_options,
                                                                            map_each=map_on_ray_data)))
    splits = assign_splits(listing, cfg.val_fraction, cfg.seed)
    log(f"{len(listing)} images in {len(listing.classes)} classes ({listing.notes['layout']}), "
        f"stored as {listing.image_shape[0]}x{listing.image_shape[1]} RGB; "
        + ", ".join(f"{s} {int((splits == s).sum())}" for s in SPLITS))

    # A stale manifest must never describe files from this run: remove it before anything moves.
    (data_dir / MANIFEST).unlink(missing_ok=True)
    for leftover in data_dir.glob(".prepare.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    staged = staging_dir(data_dir, "prepare")
    try:
        init_ray()
        check_shared_storage(staged)  # the decode tasks write their Parquet files there, on any node
        decode_started = time.perf_counter()
        merged = merge_summaries(decode_and_write(listing, splits, staged), listing.classes)
        if merged["bad"] and cfg.skip_bad_images:
            listing, splits, merged, staged = _resplit_readable(listing, splits, merged, cfg, data_dir, staged)
        decode_seconds = time.perf_counter() - decode_started
        check_written(merged, cfg.skip_bad_images, source)
        for split in SPLITS:
            (staged / split).mkdir(exist_ok=True)
            replace_dir(staged / split, data_dir / split)
    finally:
        shutil.rmtree(staged, ignore_errors=True)

    manifest = manifest_document(cfg, wanted, listing, merged, decode_seconds, time.perf_counter() - started)
    write_manifest(data_dir, manifest)  # last: marks DATA complete
    skipped = f", {len(merged['bad'])} unreadable files skipped" if merged["bad"] else ""
    log(f"wrote {data_dir}: " + ", ".join(f"{s} {manifest['totals'][s]}" for s in SPLITS)
        + f" images{skipped}; decode+write {decode_seconds:.1f} s ({len(listing) / decode_seconds:,.0f} images/s), "
          f"total {time.perf_counter() - started:.1f} s")
    return data_dir
