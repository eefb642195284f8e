"""The prepared data set on disk: Parquet per split plus ``manifest.json``.

Layout (DESIGN "Stages")::

    DATA/train/part-*.parquet   id: string, image: uint8 (H, W, 3), label: int64, label_name: string
    DATA/val/part-*.parquet     (a stratified, seeded slice of the source's train split)
    DATA/test/part-*.parquet    (the source's test split)
    DATA/manifest.json          classes, counts[split][class], source, seed, skipped, converted, files

``image`` uses Arrow's canonical ``fixed_shape_tensor`` extension type, so plain pyarrow
(``to_numpy_ndarray()``), pandas and Ray Data (``read_parquet``) all read it as an image array.
The manifest is written last; a folder without a valid manifest is incomplete by definition.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lib.errors import UserError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Settings that decide a prepared data set's content; a rerun with other values must not reuse it.
IDENTITY_KEYS = ("source", "seed", "val_fraction", "test_fraction", "skip_bad_images")
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


# --------------------------------------------------------------------------- decoding


def decode_image_file(path: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Decode one file to an RGB uint8 array of ``shape`` (H, W, 3).

    Returns the array and the conversions applied (e.g. ``"mode L->RGB"``, ``"size 40x30->32x32"``).
    Images with transparency are composited on white; other sizes are scaled to cover the target
    and centre-cropped (aspect ratio kept). Raises whatever PIL raises for a non-image or corrupt file.
    """
    from PIL import Image, ImageOps

    height, width = shape[:2]
    conversions = []
    with Image.open(path) as image:
        if image.size != (width, height) and image.format == "JPEG":
            # Let the JPEG decoder downscale by a power of two first: far cheaper for large photos.
            image.draft("RGB", (width, height))
        image.load()
        if image.mode != "RGB":
            mode = image.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                image = image.convert("RGB")
            conversions.append(f"mode {mode}->RGB")
        if image.size != (width, height):
            conversions.append(f"size {image.size[0]}x{image.size[1]}->{width}x{height}")
            image = ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    return array, conversions


def write_shard_batch(batch: dict[str, Any], *, out_dir: str, image_shape: tuple[int, int, int],
                      classes: list[str]) -> dict[str, np.ndarray]:
    """Decode one batch of listed images and write it as one Parquet file per split it touches.

    ``batch`` (a Ray Data numpy batch) has columns ``row`` (position in the listing), ``id``, ``label``,
    ``split`` and either ``path`` (files to decode) or ``image`` (pixels already in memory). Files go to
    ``out_dir/<split>/part-<first row>.parquet``; unreadable files are left out of them.
    Returns one row, ``summary``: JSON with the files written, rows and class counts per split,
    bad files as ``[path, reason]`` and conversions, for the driver to assemble the manifest.
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
    else:
        paths = np.asarray(batch["path"]).astype(str)
        images = np.zeros((n, *image_shape), dtype=np.uint8)
        ok = np.zeros(n, dtype=bool)
        for i, path in enumerate(paths):
            try:
                images[i], conversions = decode_image_file(path, image_shape)
            except Exception as err:  # noqa: BLE001 - every failure is a bad file to report
                bad.append([path, f"{type(err).__name__}: {err}".splitlines()[0][:200]])
                continue
            ok[i] = True
            for conversion in conversions:
                converted[conversion.split(" ", 1)[0]] += 1
            if conversions and len(examples) < CONVERTED_EXAMPLES:
                examples.append(f"{path} ({', '.join(conversions)})")

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
        tmp = split_dir / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, split_dir / name)
        counts = Counter(int(label) for label in labels[keep])
        written.append({"split": split, "file": f"{split}/{name}", "rows": int(keep.sum()),
                        "counts": {classes[k]: v for k, v in sorted(counts.items())}})
    summary = {"written": written, "bad": bad, "converted": dict(converted), "examples": examples}
    return {"summary": np.array([json.dumps(summary)], dtype=object)}


# --------------------------------------------------------------------------- manifest


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


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``DATA/manifest.json``; raises :class:`UserError` unless DATA is a complete prepared set."""
    data_dir = Path(data_dir)
    manifest = complete_manifest(data_dir)
    if manifest is None:
        raise UserError(f"not a prepared data set (no valid {MANIFEST}; run jobs.prepare first): {data_dir}")
    return manifest


def complete_manifest(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest if ``data_dir`` holds a complete prepared set (every listed file present), else None."""
    data_dir = Path(data_dir)
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return None
    try:
        files = [name for split in SPLITS for name in manifest["files"][split]]
    except (KeyError, TypeError):
        return None
    if not all((data_dir / name).is_file() for name in files):
        return None
    return manifest


# --------------------------------------------------------------------------- reading


@dataclass
class SplitArrays:
    """One split in memory: ``images`` (N, H, W, 3) uint8, ``labels`` (N,) int64, ``ids`` (N,) str."""

    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def split_files(data_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of ``split``'s Parquet files, from the manifest (in a stable order)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    manifest = read_manifest(data_dir)
    return [str(Path(data_dir).absolute() / name) for name in manifest["files"][split]]


def table_ids(table: pa.Table) -> np.ndarray:
    """The ``id`` column of a prepared (or embeddings) table as an object array of str."""
    return np.asarray(table.column("id").to_pylist(), dtype=object)


def table_images(table: pa.Table) -> np.ndarray:
    """The ``image`` column of a prepared table as an (N, H, W, 3) uint8 array."""
    column = table.column("image").combine_chunks()
    return column.to_numpy_ndarray()


def read_split(data_dir: str | os.PathLike, split: str, limit: int | None = None) -> SplitArrays:
    """Load one split into memory with pyarrow (no Ray), rows in file order."""
    manifest = read_manifest(data_dir)
    table = pq.ParquetDataset(split_files(data_dir, split)).read(columns=["id", "image", "label"])
    if limit is not None:
        table = table.slice(0, limit)
    return SplitArrays(ids=table_ids(table),
                       images=table_images(table),
                       labels=table.column("label").to_numpy(),
                       classes=list(manifest["classes"]))
