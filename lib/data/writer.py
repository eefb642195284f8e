"""Writing a prepared DATA (jobs.prepare): Parquet parts decoded in parallel, then the manifest, last.

Each decode task (:func:`write_shard_batch`, one Ray Data block) writes one Parquet file per split it
touches, atomically (temporary name + rename), into a staging folder; the driver merges the tasks'
summaries (:func:`merge_summaries`), moves the splits into place and writes ``manifest.json``
(:func:`write_manifest`) last, so a crash never leaves a DATA that looks complete. See :mod:`lib.data`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from lib.data.images import fit_image_array, read_image_file
from lib.data.reader import MANIFEST, SPLITS
from lib.io import atomic_path, write_json
from lib.parquet import write_parquet
from lib.sources.location import file_uri

# Settings that decide a prepared data set's content; a rerun with other values must not reuse it.
IDENTITY_KEYS = ("source", "seed", "val_fraction", "test_fraction", "skip_bad_images", "image_size", "max_side")
# At most this many converted files are named in the manifest (all are counted).
CONVERTED_EXAMPLES = 50


def parquet_schema(image_shape: tuple[int, int, int]) -> pa.Schema:
    """The schema of every split's Parquet files."""
    return pa.schema([
        pa.field("id", pa.string()),
        pa.field("image", pa.fixed_shape_tensor(pa.uint8(), list(image_shape))),
        pa.field("label", pa.int64()),
        pa.field("label_name", pa.string()),
    ])


def write_shard_batch(batch: dict[str, Any], *, out_dir: str, image_shape: tuple[int, int, int],
                      classes: list[str], filesystem: pafs.FileSystem | None = None) -> dict[str, np.ndarray]:
    """Decode one batch of listed images and write it as one Parquet file per split it touches.

    ``batch`` (a Ray Data numpy batch) has columns ``row`` (position in the listing), ``id``, ``label``,
    ``split`` and either ``path`` (files on ``filesystem`` to decode; default the local disk) or ``image``
    (pixels already in memory). Files go to ``out_dir/<split>/part-<first row>.parquet``; unreadable files
    are left out of them. Returns one row, ``summary``: JSON with the files written, rows and class counts
    per split, bad files as ``[file, reason]`` (the file as :func:`lib.sources.file_uri` names it) and
    conversions, for the driver to assemble the manifest.
    """
    rows = np.asarray(batch["row"])
    ids = np.asarray(batch["id"]).astype(str)
    labels = np.asarray(batch["label"], dtype=np.int64)
    splits = np.asarray(batch["split"]).astype(str)
    n = len(rows)
    bad: list[list[str]] = []
    converted: Counter[str] = Counter()
    examples: list[str] = []
    if "image" in batch:
        images = np.asarray(batch["image"], dtype=np.uint8)
        ok = np.ones(n, dtype=bool)
        if images.shape[1:] != tuple(image_shape):  # a stored size chosen for pixels already in memory
            images = np.array([fit_image_array(image, image_shape) for image in images],
                              dtype=np.uint8).reshape((n, *image_shape))
            converted["size"] += n
    else:
        filesystem = filesystem or pafs.LocalFileSystem()
        paths = np.asarray(batch["path"]).astype(str)
        images = np.zeros((n, *image_shape), dtype=np.uint8)
        ok = np.zeros(n, dtype=bool)
        for i, path in enumerate(paths):
            name = file_uri(filesystem, path)
            try:
                images[i], conversions = read_image_file(filesystem, path, image_shape, name=name)
            except Exception as err:  # noqa: BLE001 - every failure is a bad file to report
                bad.append([name, f"{type(err).__name__}: {err}".splitlines()[0][:200]])
                continue
            ok[i] = True
            for conversion in conversions:
                converted[conversion.split(" ", 1)[0]] += 1
            if conversions and len(examples) < CONVERTED_EXAMPLES:
                examples.append(f"{name} ({', '.join(conversions)})")

    written = []
    for split in sorted(set(splits.tolist())):
        keep = ok & (splits == split)
        if not keep.any():
            continue
        first_row = int(rows[splits == split].min())
        split_dir = Path(out_dir) / split
        split_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{first_row:07d}.parquet"
        table = pa.table({
            "id": pa.array(ids[keep], pa.string()),
            "image": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(images[keep])),
            "label": pa.array(labels[keep], pa.int64()),
            "label_name": pa.array([classes[i] for i in labels[keep]], pa.string()),
        }, schema=parquet_schema(image_shape))
        with atomic_path(split_dir / name) as tmp:
            write_parquet(table, tmp)
        counts = Counter(int(label) for label in labels[keep])
        written.append({"split": split, "file": f"{split}/{name}", "rows": int(keep.sum()),
                        "counts": {classes[k]: v for k, v in sorted(counts.items())}})
    summary = {"written": written, "bad": bad, "converted": dict(converted), "examples": examples}
    return {"summary": np.array([json.dumps(summary)], dtype=object)}


def merge_summaries(summaries: list[dict], classes: list[str]) -> dict[str, Any]:
    """Combine :func:`write_shard_batch` summaries into the manifest's counts, files and problem lists."""
    counts = {split: {name: 0 for name in classes} for split in SPLITS}
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    bad: list[list[str]] = []
    converted: Counter[str] = Counter()
    examples: list[str] = []
    for summary in summaries:
        for item in summary["written"]:
            files[item["split"]].append(item["file"])
            for name, count in item["counts"].items():
                counts[item["split"]][name] += count
        bad.extend(summary["bad"])
        converted.update(summary["converted"])
        examples.extend(summary["examples"])
    return {
        "counts": counts,
        "files": {split: sorted(names) for split, names in files.items()},
        "bad": sorted(bad),
        "converted": {"to_rgb": converted.get("mode", 0), "resized": converted.get("size", 0),
                      "examples": sorted(examples)[:CONVERTED_EXAMPLES]},
    }


def write_manifest(data_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``DATA/manifest.json`` atomically: the last file written, it marks DATA complete."""
    return write_json(Path(data_dir) / MANIFEST, manifest)
