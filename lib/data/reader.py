"""Reading a prepared DATA: the manifest (parsed once), its completeness and damage checks, the Parquet splits.

Every reader of DATA goes through :class:`PreparedData`: a folder is a prepared set only when its
``manifest.json`` is valid and lists files that exist (:meth:`PreparedData.find`); :meth:`PreparedData.open`
also reads every Parquet footer and compares row counts, so a truncated file fails with one line.
See :mod:`lib.data` for the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lib.errors import UserError
from lib.parquet import read_dataset

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``DATA/manifest.json``; raises :class:`UserError` unless DATA is a complete prepared set."""
    return PreparedData.open(data_dir).manifest


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
        return read_dataset(self.files(split), columns, filters)

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
