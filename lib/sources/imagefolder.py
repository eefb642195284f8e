"""Image-folder sources: ``root/{train,test}/<class>/*`` or one tree ``root/<class>/*``, on any filesystem.

``--source imagefolder:PATH`` names a local folder or a URI (``imagefolder:s3://bucket/prefix``); the tree is
walked through a ``pyarrow.fs.FileSystem`` and the listing names files on it, decoded later by the prepare
tasks through the same filesystem object. Listing reads names and, for the image size, a sample of headers
(none when the stored size is given).

For a URI the top of the tree (the root, its ``train``/``test`` folders, the class folder names: a few
requests) is read here, so a missing bucket or refused credentials fail at once; the class folders are then
listed, and the headers read, through ``ListOptions.map_each`` (in jobs.prepare: Ray Data tasks), since on
object storage each is a chain of network requests. A local tree is walked in this process.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow.fs as pafs

from lib.errors import UserError
from lib.sources.location import OBJECT_STORES, Location, credentials_hint, file_uri, join, parse_location
from lib.sources.picking import stratified_pick
from lib.sources.registry import (
    SOURCE_SPLITS,
    DataSource,
    Listing,
    ListOptions,
    MapEach,
    map_in_this_process,
    register_source,
)

# How many image headers to open when choosing the data set's image size.
SIZE_SAMPLE = 512
# Headers read by one task of ``map_each`` (a sample of 512 is 32 tasks).
HEADERS_PER_TASK = 16


@register_source("imagefolder")
@dataclass(frozen=True)
class ImageFolderSource(DataSource):
    """``imagefolder:PATH``: a labelled image tree at ``location`` (a local path or a URI)."""

    location: Location
    forms = ("imagefolder:PATH",)

    @classmethod
    def parse(cls, argument: str | None) -> ImageFolderSource:
        if not argument or not argument.strip():
            raise UserError("--source imagefolder needs a folder: imagefolder:PATH (a local path or a URI such "
                            "as s3://bucket/prefix)")
        return cls(parse_location(argument))

    def list_images(self, options: ListOptions) -> Listing:
        filesystem, root = self.location.resolve()
        # a local walk is fast: only a URI's folders are worth tasks of their own
        map_each = options.map_each if self.location.is_uri else map_in_this_process
        return list_image_folder(root, options.test_fraction, options.seed, filesystem=filesystem,
                                 map_each=map_each, image_shape=options.image_shape)

    def __str__(self) -> str:
        return f"imagefolder:{self.location}"


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini")


def _kind(filesystem: pafs.FileSystem, path: str) -> pafs.FileType:
    return filesystem.get_file_info(path).type


def _subfolders(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """Names of the non-hidden folders directly in ``folder``, sorted."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        # os semantics: a symlink to a folder counts (os.path.isdir follows it)
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _is_hidden(e.name))
    entries = filesystem.get_file_info(pafs.FileSelector(folder))
    return sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory and not _is_hidden(e.base_name))


def _walk_order(relative: str) -> tuple:
    """Sort key of a file below a class folder in ``os.walk`` order: a folder's files, then its subfolders."""
    *folders, name = relative.split("/")
    return (*((1, f) for f in folders), (0, name))


def _files_below(filesystem: pafs.FileSystem, class_dir: str) -> list[str]:
    """Every non-hidden file below ``class_dir`` (recursively, hidden folders skipped), in walk order.

    Non-images are caught at decode. On a local disk ``os.walk`` lists the tree: it names broken links (which
    the decoder then reports, rather than dropping them unseen) and does not descend into linked subfolders.
    """
    if isinstance(filesystem, pafs.LocalFileSystem):
        found = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not _is_hidden(f))
        return found
    prefix = class_dir.rstrip("/") + "/"
    relative = []
    for entry in filesystem.get_file_info(pafs.FileSelector(class_dir, recursive=True)):
        rest = entry.path[len(prefix):] if entry.path.startswith(prefix) else entry.path
        if entry.type == pafs.FileType.File and not any(_is_hidden(part) for part in rest.split("/")):
            relative.append(rest)
    return [join(class_dir, rest) for rest in sorted(relative, key=_walk_order)]


def _list_class_folder(filesystem: pafs.FileSystem, class_dir: str) -> dict:
    """One ``map_each`` task: ``{"files": [...]}`` below ``class_dir``, or ``{"error": reason}``."""
    try:
        return {"files": _files_below(filesystem, class_dir)}
    except OSError as err:
        return {"error": str(err).splitlines()[0] if str(err) else type(err).__name__}


def list_image_folder(root: str | os.PathLike, test_fraction: float = 0.2, seed: int = 0,
                      filesystem: pafs.FileSystem | None = None, map_each: MapEach = map_in_this_process,
                      image_shape: tuple[int, int, int] | None = None) -> Listing:
    """List ``root/{train,test}/<class>/*`` or, without split folders, ``root/<class>/*``.

    ``root`` is a path on ``filesystem`` (default: the local disk, ``root`` made absolute). A single tree is
    split into train and test by :func:`stratified_pick` with ``test_fraction``. Raises :class:`UserError`
    for a missing root (or bucket), no images, a class present under only one split, an empty class folder,
    or fewer than two classes. Ids are ``<split>/<class>/<file>`` paths relative to ``root``. The class
    folders are listed, and the headers read, through ``map_each``; ``image_shape`` given, no header is read.
    """
    if filesystem is None:
        filesystem, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(os.fspath(root)))
    root = os.fspath(root)
    if root != "/":
        root = root.rstrip("/")

    def where(*names: str) -> str:
        return file_uri(filesystem, join(root, *names))

    try:
        return _list_tree(filesystem, root, where, test_fraction, seed, map_each, image_shape)
    except OSError as err:  # unreadable folder, lost connection, missing credentials
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot list image folder {where()}: {reason}{credentials_hint(filesystem)}") from None


def _bucket_is_missing(filesystem: pafs.FileSystem, root: str) -> str | None:
    """On object storage, the bucket of ``root`` when it does not exist (else None)."""
    if not isinstance(filesystem, OBJECT_STORES) or not root.strip("/"):
        return None
    bucket = root.strip("/").split("/")[0]
    return bucket if _kind(filesystem, bucket) == pafs.FileType.NotFound else None


def _list_tree(filesystem: pafs.FileSystem, root: str, where, test_fraction: float, seed: int,
               map_each: MapEach, image_shape: tuple[int, int, int] | None) -> Listing:
    kind = _kind(filesystem, root)
    if kind == pafs.FileType.NotFound:
        bucket = _bucket_is_missing(filesystem, root)
        if bucket is not None:
            raise UserError(f"bucket does not exist: {file_uri(filesystem, bucket)} (source {where()})")
        raise UserError(f"source folder does not exist: {where()}")
    if kind != pafs.FileType.Directory:
        raise UserError(f"source is not a folder: {where()}")
    split_kinds = filesystem.get_file_info([join(root, s) for s in SOURCE_SPLITS])
    split_dirs = {s: join(root, s) for s, info in zip(SOURCE_SPLITS, split_kinds, strict=True)
                  if info.type == pafs.FileType.Directory}
    if len(split_dirs) == 1:
        (present,) = split_dirs
        missing = "test" if present == "train" else "train"
        raise UserError(f"image folder has {present}/ but no {missing}/: {where()} "
                        f"(use {where()}/train/<class>/ and {where()}/test/<class>/, or one tree {where()}/<class>/)")

    # (split, class) -> the class folder: its names are read here, its files by map_each
    class_dirs: dict[tuple[str, str], str] = {}
    if split_dirs:
        for split, split_dir in split_dirs.items():
            class_dirs.update({(split, name): join(split_dir, name) for name in _subfolders(filesystem, split_dir)})
    else:
        class_dirs.update({("all", name): join(root, name) for name in _subfolders(filesystem, root)})
    listed = map_each(partial(_list_class_folder, filesystem), list(class_dirs.values()))
    per_split: dict[str, dict[str, list[str]]] = {split: {} for split in (split_dirs or ("all",))}
    for ((split, name), class_dir), result in zip(class_dirs.items(), listed, strict=True):
        if "error" in result:
            raise UserError(f"cannot list image folder {file_uri(filesystem, class_dir)}: {result['error']}"
                            f"{credentials_hint(filesystem)}")
        per_split[split][name] = result["files"]
    if split_dirs:
        train_classes, test_classes = set(per_split["train"]), set(per_split["test"])
        if train_classes != test_classes:
            only_train = sorted(train_classes - test_classes)
            only_test = sorted(test_classes - train_classes)
            place = (f"{only_train} only under {where('train')}" if only_train
                     else f"{only_test} only under {where('test')}")
            raise UserError(f"class folders must exist under both train/ and test/: {place}")

    n_files = sum(len(files) for classes in per_split.values() for files in classes.values())
    if n_files == 0:
        raise UserError(f"no images found in {where()} (expected {where()}/<class>/<image> "
                        f"or {where()}/train/<class>/<image> and {where()}/test/<class>/<image>)")
    classes = sorted({c for by_class in per_split.values() for c in by_class})
    if len(classes) < 2:
        raise UserError(f"only one class folder ({classes[0]!r}) in {where()}: retrieval and "
                        f"clustering need at least two classes")
    for split, by_class in per_split.items():
        for name, files in by_class.items():
            if not files:
                raise UserError(f"class folder has no images: {where(name) if split == 'all' else where(split, name)}")

    class_index = {name: i for i, name in enumerate(classes)}
    files, ids, labels, splits = [], [], [], []
    prefix = len(join(root, ""))  # "root/": ids are the paths below it
    for split, by_class in per_split.items():
        for name in sorted(by_class):
            for file in by_class[name]:
                files.append(file)
                ids.append(file[prefix:])
                labels.append(class_index[name])
                splits.append(split)
    labels_arr = np.asarray(labels, dtype=np.int64)
    splits_arr = np.asarray(splits, dtype=object)
    if not split_dirs:
        is_test = stratified_pick(ids, labels_arr, test_fraction, seed)
        splits_arr = np.where(is_test, "test", "train").astype(object)
    if image_shape is None:
        image_shape = common_image_shape(files, seed, filesystem=filesystem, map_each=map_each)
    return Listing(classes=classes, ids=ids, labels=labels_arr, source_split=splits_arr,
                   image_shape=tuple(image_shape), files=files, filesystem=filesystem,
                   notes={"layout": "train/test folders" if split_dirs else
                          f"one tree, test split drawn by seed (test_fraction={test_fraction})"})


def _header_sizes(filesystem: pafs.FileSystem, files: list[str]) -> list[list[int] | None]:
    """One ``map_each`` task: ``[height, width]`` of each file from its header, None where it does not open."""
    from PIL import Image

    sizes: list[list[int] | None] = []
    for file in files:
        try:
            with filesystem.open_input_file(file) as handle, Image.open(handle) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001 - any unreadable file is reported by the decoder
            sizes.append(None)
            continue
        sizes.append([height, width])
    return sizes


def common_image_shape(files: list[str], seed: int = 0, sample: int = SIZE_SAMPLE,
                       filesystem: pafs.FileSystem | None = None,
                       map_each: MapEach = map_in_this_process) -> tuple[int, int, int]:
    """The most common (height, width) among a seeded sample of image headers, as (H, W, 3).

    Only headers are read, through ``filesystem`` (default: the local disk), by ``map_each`` tasks of
    :data:`HEADERS_PER_TASK` files. Files that fail to open are left for the decoder to report. Images of
    other sizes are resized to this shape when decoded.
    """
    filesystem = filesystem or pafs.LocalFileSystem()
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), size=min(sample, len(files)), replace=False))
    chunks = [[files[i] for i in chosen[start:start + HEADERS_PER_TASK]]
              for start in range(0, len(chosen), HEADERS_PER_TASK)]
    sizes: Counter[tuple[int, int]] = Counter(
        tuple(size) for chunk_sizes in map_each(partial(_header_sizes, filesystem), chunks)
        for size in chunk_sizes if size is not None)
    if not sizes:
        raise UserError(f"none of {len(chosen)} sampled files could be opened as an image, e.g. "
                        f"{file_uri(filesystem, files[int(chosen[0])])}")
    (height, width), _ = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))
    return (height, width, 3)

