"""Image-folder sources: ``root/{train,test}/<class>/*`` or one tree ``root/<class>/*``.

Listing reads names and, for the image size, a sample of headers; the pixels are decoded later.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from lib.errors import UserError
from lib.sources import SOURCE_SPLITS, Listing, stratified_pick

# How many image headers to open when choosing the data set's image size.
SIZE_SAMPLE = 512


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _files_under(class_dir: Path) -> list[Path]:
    """Every non-hidden file below ``class_dir`` (recursively), sorted; non-images are caught at decode."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(f))
    return found


def list_image_folder(root: Path, test_fraction: float = 0.2, seed: int = 0) -> Listing:
    """List ``root/{train,test}/<class>/*`` or, without split folders, ``root/<class>/*``.

    A single tree is split into train and test by :func:`stratified_pick` with ``test_fraction``.
    Raises :class:`UserError` for a missing root, no images, a class present under only one split,
    an empty class folder, or fewer than two classes.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"source folder does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"source is not a folder: {root}")
    split_dirs = {s: root / s for s in SOURCE_SPLITS if (root / s).is_dir()}
    if len(split_dirs) == 1:
        (present,) = split_dirs
        missing = "test" if present == "train" else "train"
        raise UserError(f"image folder has {present}/ but no {missing}/: {root} "
                        f"(use {root}/train/<class>/ and {root}/test/<class>/, or one tree {root}/<class>/)")

    per_split: dict[str, dict[str, list[Path]]] = {}
    if split_dirs:
        for split, split_dir in split_dirs.items():
            per_split[split] = {d.name: _files_under(d) for d in _class_dirs(split_dir)}
        train_classes, test_classes = set(per_split["train"]), set(per_split["test"])
        if train_classes != test_classes:
            only_train = sorted(train_classes - test_classes)
            only_test = sorted(test_classes - train_classes)
            where = (f"{only_train} only under {root / 'train'}" if only_train
                     else f"{only_test} only under {root / 'test'}")
            raise UserError(f"class folders must exist under both train/ and test/: {where}")
    else:
        per_split["all"] = {d.name: _files_under(d) for d in _class_dirs(root)}

    n_files = sum(len(files) for classes in per_split.values() for files in classes.values())
    if n_files == 0:
        raise UserError(f"no images found in {root} (expected {root}/<class>/<image> "
                        f"or {root}/train/<class>/<image> and {root}/test/<class>/<image>)")
    classes = sorted({c for by_class in per_split.values() for c in by_class})
    if len(classes) < 2:
        raise UserError(f"only one class folder ({classes[0]!r}) in {root}: retrieval and "
                        f"clustering need at least two classes")
    for split, by_class in per_split.items():
        for name, files in by_class.items():
            if not files:
                folder = root / name if split == "all" else root / split / name
                raise UserError(f"class folder has no images: {folder}")

    class_index = {name: i for i, name in enumerate(classes)}
    paths, ids, labels, splits = [], [], [], []
    for split, by_class in per_split.items():
        for name in sorted(by_class):
            for file in by_class[name]:
                paths.append(str(file))
                ids.append(file.relative_to(root).as_posix())
                labels.append(class_index[name])
                splits.append(split)
    labels_arr = np.asarray(labels, dtype=np.int64)
    splits_arr = np.asarray(splits, dtype=object)
    if not split_dirs:
        is_test = stratified_pick(ids, labels_arr, test_fraction, seed)
        splits_arr = np.where(is_test, "test", "train").astype(object)
    return Listing(classes=classes, ids=ids, labels=labels_arr, source_split=splits_arr,
                   image_shape=common_image_shape(paths, seed), paths=paths,
                   notes={"layout": "train/test folders" if split_dirs else
                          f"one tree, test split drawn by seed (test_fraction={test_fraction})"})


def common_image_shape(paths: list[str], seed: int = 0, sample: int = SIZE_SAMPLE) -> tuple[int, int, int]:
    """The most common (height, width) among a seeded sample of image headers, as (H, W, 3).

    Only headers are read. Files that fail to open are left for the decoder to report.
    Images of other sizes are resized to this shape when decoded.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(sample, len(paths)), replace=False)
    sizes: Counter[tuple[int, int]] = Counter()
    for index in sorted(chosen):
        try:
            with Image.open(paths[index]) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001 - any unreadable file is reported by the decoder
            continue
        sizes[(height, width)] += 1
    if not sizes:
        raise UserError(f"none of {len(chosen)} sampled files could be opened as an image, e.g. "
                        f"{paths[int(chosen[0])]}")
    (height, width), _ = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))
    return (height, width, 3)
