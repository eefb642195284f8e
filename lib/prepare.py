"""What ``jobs.prepare`` decides without Ray: its config, the split of a listing, rerun checks, the manifest.

The Ray side (decoding and writing Parquet in parallel) is :mod:`onray.prepare`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lib.config import check_ranges, option, to_dict
from lib.console import log
from lib.data.reader import FORMAT_VERSION, SPLITS, PreparedData
from lib.data.writer import IDENTITY_KEYS
from lib.errors import UserError
from lib.sources import DataSource, Listing, ListOptions, parse_source, stratified_pick

# The largest --image-size / --max-side: 4096 x 4096 x 3 is 48 MiB per stored image.
MAX_STORED_SIDE = 4096


@dataclass(frozen=True)
class PrepareConfig:
    """Decode a labelled image source into Parquet train/val/test splits for the other jobs."""

    source: str = option(help="cifar10 (download), cifar10:PATH (extracted cifar-10-batches-py or the "
                              ".tar.gz) or imagefolder:PATH (PATH/{train,test}/<class>/* or PATH/<class>/*; "
                              "a local folder or a URI such as s3://bucket/prefix), or another registered kind")
    data_dir: str = option(help="output folder DATA")
    val_fraction: float = option(0.1, help="share of each class of the source's train split held out as val")
    test_fraction: float = option(0.2, help="share of each class used as test when an image folder has "
                                            "no train/ and test/ folders")
    seed: int = option(0, help="seed of the val (and single-tree test) split")
    skip_bad_images: bool = option(False, help="skip unreadable files (counted and listed in the manifest) "
                                               "instead of stopping")
    image_size: int | None = option(None, help="store every image at S x S pixels (scaled to cover, "
                                               "centre-cropped) instead of the source's most common size")
    max_side: int | None = option(None, help="store images at the source's most common size scaled down so "
                                             "neither side exceeds M pixels (aspect ratio kept; never enlarged)")
    cache_dir: str = option("~/.cache/cifar-embeddings", help="where cifar10 downloads and extracts to")

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
        check_ranges(self, positive=("image_size", "max_side"), non_negative=("seed",),
                     at_most={"image_size": MAX_STORED_SIDE, "max_side": MAX_STORED_SIDE})
        if self.image_size is not None and self.max_side is not None:
            raise UserError("give --image-size or --max-side, not both")
        self.data_source  # noqa: B018 - a bad --source fails here, when the config is made

    @cached_property
    def data_source(self) -> DataSource:
        """``source`` parsed (once) by the registered kind."""
        return parse_source(self.source)

    @property
    def list_options(self) -> ListOptions:
        chosen = (self.image_size, self.image_size, 3) if self.image_size is not None else None
        return ListOptions(cache_dir=Path(self.cache_dir), test_fraction=self.test_fraction, seed=self.seed,
                           image_shape=chosen)


def stored_shape(cfg: PrepareConfig, source_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (H, W, 3) every image is stored at: ``--image-size S`` -> (S, S, 3); ``--max-side M`` ->
    ``source_shape`` (the source's most common size) scaled so its longer side is at most M, aspect ratio
    kept and each side rounded (never enlarged); neither -> ``source_shape``."""
    if cfg.image_size is not None:
        return (cfg.image_size, cfg.image_size, 3)
    height, width = source_shape[:2]
    if cfg.max_side is None or max(height, width) <= cfg.max_side:
        return (height, width, 3)
    scale = cfg.max_side / max(height, width)
    return (max(1, round(height * scale)), max(1, round(width * scale)), 3)


def with_stored_shape(cfg: PrepareConfig, listing: Listing) -> Listing:
    """``listing`` with ``image_shape`` the stored shape (:func:`stored_shape`); the shape the source measured
    goes into its notes as ``most_common_shape`` (absent with ``--image-size``: nothing was measured)."""
    notes = dict(listing.notes)
    if cfg.image_size is None:
        notes["most_common_shape"] = list(listing.image_shape)
    return dataclasses.replace(listing, image_shape=stored_shape(cfg, listing.image_shape), notes=notes)


def identity(cfg: PrepareConfig) -> dict[str, Any]:
    """The settings that decide DATA's content (see :data:`lib.data.writer.IDENTITY_KEYS`)."""
    return {"source": str(cfg.data_source), "seed": cfg.seed, "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction, "skip_bad_images": cfg.skip_bad_images,
            "image_size": cfg.image_size, "max_side": cfg.max_side}


def check_existing(data_dir: Path, wanted: dict[str, Any]) -> bool:
    """True when DATA already holds this exact data set; raises if it holds another or foreign files."""
    data = PreparedData.find(data_dir)
    if data is not None:
        held = {key: data.manifest.get(key) for key in IDENTITY_KEYS}
        damage = data.damage() if held == wanted else None
        if held == wanted and not damage:
            return True
        if damage:
            log(f"{data_dir} is damaged ({damage}); preparing it again")
            return False
        diff = ", ".join(f"{k}={held[k]!r} (asked {wanted[k]!r})" for k in wanted if held[k] != wanted[k])
        raise UserError(f"{data_dir} already holds a data set prepared with other settings: {diff}; "
                        f"choose another --data-dir or remove it")
    for split in SPLITS:
        split_dir = data_dir / split
        if split_dir.exists():
            # what this job writes there: Parquet parts, and the temporary names of an interrupted write
            foreign = [p for p in split_dir.iterdir() if not p.name.endswith(".parquet")
                       and not (p.name.startswith(".part-") and p.name.endswith(".tmp"))]
            if not split_dir.is_dir() or foreign:
                raise UserError(f"{split_dir} holds files that jobs.prepare did not write; "
                                f"choose another --data-dir")
    return False


def assign_splits(listing: Listing, val_fraction: float, seed: int) -> np.ndarray:
    """Each listed image's split: the source's test split, and train with a stratified seeded val slice."""
    splits = listing.source_split.copy()
    train_rows = np.flatnonzero(splits == "train")
    is_val = stratified_pick([listing.ids[i] for i in train_rows], listing.labels[train_rows], val_fraction, seed)
    splits[train_rows[is_val]] = "val"
    return splits


def check_written(merged: dict[str, Any], skip_bad_images: bool, source: DataSource) -> None:
    """Stop on unreadable images (unless skipped) and on split/class pairs left without images."""
    if merged["bad"] and not skip_bad_images:
        path, reason = merged["bad"][0]
        more = f" and {len(merged['bad']) - 1} more" if len(merged["bad"]) > 1 else ""
        raise UserError(f"cannot read image {path} ({reason}){more}; use --skip-bad-images to leave such files out")
    empty = [f"{split}/{name}" for split in SPLITS for name, n in merged["counts"][split].items() if n == 0]
    if empty:
        raise UserError(f"after skipping unreadable files these split/class pairs have no images: "
                        f"{', '.join(empty[:5])} (source {source})")


def manifest_document(cfg: PrepareConfig, wanted: dict[str, Any], listing: Listing, merged: dict[str, Any],
                      decode_seconds: float, total_seconds: float) -> dict[str, Any]:
    """``DATA/manifest.json`` (see :mod:`lib.data`)."""
    return {
        "format_version": FORMAT_VERSION,
        **wanted,
        "classes": listing.classes,
        "image_shape": list(listing.image_shape),
        "counts": merged["counts"],
        "totals": {split: sum(merged["counts"][split].values()) for split in SPLITS},
        "files": merged["files"],
        "skipped": [{"path": path, "reason": reason} for path, reason in merged["bad"]],
        "converted": merged["converted"],
        "source_notes": listing.notes,
        "config": to_dict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timing": {"decode_write_seconds": round(decode_seconds, 3), "total_seconds": round(total_seconds, 3)},
    }
