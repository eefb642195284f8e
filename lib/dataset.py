"""The prepared data set on disk: Parquet per split plus ``manifest.json``.

Layout::

    DATA/train/part-*.parquet   id: string, image: uint8 (H, W, 3), label: int64, label_name: string
    DATA/val/part-*.parquet     (a stratified, seeded slice of the source's train split)
    DATA/test/part-*.parquet    (the source's test split)
    DATA/manifest.json          classes, counts[split][class], source, seed, skipped, converted, files

``image`` uses Arrow's canonical ``fixed_shape_tensor`` extension type, so plain pyarrow
(``to_numpy_ndarray()``), pandas and Ray Data (``read_parquet``) all read it as an image array.
The manifest is written last; a folder without a valid manifest is incomplete by definition.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lib.errors import UserError
from lib.io import atomic_path

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


def decode_image_file(path: str | BinaryIO, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Decode one file (a path or an open binary file) to an RGB uint8 array of ``shape`` (H, W, 3).

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
        with atomic_path(split_dir / name) as tmp:
            pq.write_table(table, tmp)
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
    return PreparedData.open(data_dir).manifest


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


def table_ids(table: pa.Table) -> np.ndarray:
    """The ``id`` column of a prepared (or embeddings) table as an object array of str."""
    return np.asarray(table.column("id").to_pylist(), dtype=object)


def table_images(table: pa.Table) -> np.ndarray:
    """The ``image`` column of a prepared table as an (N, H, W, 3) uint8 array."""
    column = table.column("image").combine_chunks()
    return column.to_numpy_ndarray()


def _missing_listed_file(root: Path) -> Path | None:
    """The first file a valid manifest in ``root`` lists that is not there (a deleted Parquet file), else None."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        names = [name for split in SPLITS for name in manifest["files"][split]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((root / name for name in names if isinstance(name, str) and not (root / name).is_file()), None)


@dataclass(frozen=True)
class PreparedData:
    """A complete prepared DATA, its manifest parsed once; every reader of DATA goes through it."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def find(cls, data_dir: str | os.PathLike) -> PreparedData | None:
        """The prepared set in ``data_dir`` if it is complete (a valid manifest, every listed file present)."""
        root = Path(data_dir).expanduser().absolute()
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            return None
        try:
            files = [name for split in SPLITS for name in manifest["files"][split]]
        except (KeyError, TypeError):
            return None
        if not all((root / name).is_file() for name in files):
            return None
        return cls(root, manifest)

    @classmethod
    def open(cls, data_dir: str | os.PathLike) -> PreparedData:
        """:meth:`find`, verified (:meth:`damage`); a :class:`UserError` naming ``data_dir`` or the damaged file
        when it is not a complete, undamaged prepared set."""
        data = cls.find(data_dir)
        if data is None:
            missing = _missing_listed_file(Path(data_dir).expanduser().absolute())
            if missing:
                raise UserError(f"damaged prepared data: {missing} is missing; rerun jobs.prepare with the same flags "
                                f"to prepare {Path(data_dir).expanduser().absolute()} again")
            raise UserError(f"not a prepared data set (no valid {MANIFEST}; run jobs.prepare first): {data_dir}")
        damage = data.damage()
        if damage:
            raise UserError(f"damaged prepared data: {damage}; rerun jobs.prepare with the same flags to prepare "
                            f"{data.root} again")
        return data

    def damage(self) -> str | None:
        """What is wrong with the Parquet files, or None: every file's footer is read (a truncated or foreign
        file has none) and each split's row count compared with the manifest's. Cheap: no pixel is read."""
        for split in SPLITS:
            rows = 0
            for path in self.files(split):
                try:
                    rows += pq.ParquetFile(path).metadata.num_rows
                except Exception as err:  # noqa: BLE001 - any failure to read a footer is damage
                    return f"{path} is not a readable Parquet file ({type(err).__name__}: {str(err).splitlines()[0]})"
            if rows != self.rows(split):
                return f"the {split} files hold {rows} rows, the manifest says {self.rows(split)}"
        return None

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    def rows(self, split: str) -> int:
        return int(self.manifest["totals"][split])

    def files(self, split: str) -> list[str]:
        """Absolute paths of ``split``'s Parquet files, from the manifest (in a stable order)."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
        return [str(self.root / name) for name in self.manifest["files"][split]]

    def fingerprint(self) -> str:
        """SHA-256 of ``manifest.json``: it lists every file and count, so new data means a new value."""
        return hashlib.sha256((self.root / MANIFEST).read_bytes()).hexdigest()

    def read_table(self, split: str, columns: list[str], filters: Any = None) -> pa.Table:
        return pq.ParquetDataset(self.files(split), filters=filters).read(columns=columns)

    def ids_and_labels(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) str, labels (N,) int64) of ``split`` without reading its pixels."""
        table = self.read_table(split, ["id", "label"])
        return table_ids(table), table.column("label").to_numpy()

    def read_split(self, split: str, limit: int | None = None) -> SplitArrays:
        """Load one split into memory with pyarrow (no Ray), rows in file order."""
        table = self.read_table(split, ["id", "image", "label"])
        if limit is not None:
            table = table.slice(0, limit)
        return SplitArrays(ids=table_ids(table), images=table_images(table),
                           labels=table.column("label").to_numpy(), classes=self.classes)

    def images_by_id(self, split: str, ids: list[str]) -> np.ndarray:
        """(len(ids), H, W, 3) uint8 pixels of the given ids of ``split``, in the order given."""
        import pyarrow.compute as pc

        table = self.read_table(split, ["id", "image"], filters=pc.field("id").isin(list(ids)))
        position = {row_id: i for i, row_id in enumerate(table.column("id").to_pylist())}
        missing = [i for i in ids if i not in position]
        if missing:
            raise UserError(f"id {missing[0]!r} is not in the {split} split of {self.root}")
        return table_images(table)[[position[i] for i in ids]]


def write_subset(data: PreparedData, split: str, ids: np.ndarray, folder: str | os.PathLike, parts: int) -> list[str]:
    """The rows of ``split`` whose id is in ``ids`` as ``parts`` Parquet files in ``folder`` (written once).

    A training subset (``--train-per-class``) is chosen by the driver and written here once, so each trainer,
    each Tune trial and each resumed run reads a few small files instead of the whole split filtered again.
    The folder appears whole or not at all (written aside, then renamed), so concurrent writers and an
    interrupted write are harmless; the caller names the folder after everything that decides its rows.
    """
    import pyarrow.compute as pc

    folder = Path(folder)
    names = [f"part-{i:03d}.parquet" for i in range(max(1, parts))]
    if not all((folder / name).is_file() for name in names):
        folder.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            wanted = pa.array(np.asarray(ids).astype(str))
            tables = []
            for path in data.files(split):
                table = pq.read_table(path)
                tables.append(table.filter(pc.is_in(table.column("id"), value_set=wanted)))
            subset = pa.concat_tables(tables)
            bounds = np.linspace(0, len(subset), len(names) + 1).astype(int)
            for name, start, stop in zip(names, bounds[:-1], bounds[1:], strict=True):
                pq.write_table(subset.slice(start, stop - start), staged / name)
            try:
                os.rename(staged, folder)
            except OSError:  # another writer finished first (or a partial folder is in the way)
                if not all((folder / name).is_file() for name in names):
                    shutil.rmtree(folder, ignore_errors=True)
                    os.rename(staged, folder)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return [str(folder / name) for name in names]
