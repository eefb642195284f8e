"""Where images come from: a labelled image folder, or CIFAR-10 in its official format.

A source is listed in the driver (cheap: names and labels only, no pixels) and validated there,
so bad input fails in a second with one line, before any cluster work starts. The pixels are
decoded later, in parallel, by :mod:`lib.dataset`'s batch functions running on Ray Data.

Identity of an image (its ``id``) is the relative path ``<split>/<class>/<file>`` for image folders
(the copy of CIFAR-10 in ``shared/datasets`` says to treat (split, class, file name) as identity)
and ``<split>/<index>`` for the official CIFAR-10 batches (the index in the official order).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
# md5 of each file in the official archive (as published with torchvision's CIFAR10 dataset).
CIFAR10_FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

SOURCE_SPLITS = ("train", "test")
# How many image headers to open when choosing the data set's image size.
SIZE_SAMPLE = 512


@dataclass(frozen=True)
class Source:
    """A parsed ``--source``: ``kind`` is ``"cifar10"`` or ``"imagefolder"``; ``path`` may be None for cifar10."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_source(text: str) -> Source:
    """Parse ``cifar10``, ``cifar10:DIR`` (extracted batches or the .tar.gz) or ``imagefolder:PATH``."""
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind == "cifar10":
        return Source("cifar10", Path(rest).expanduser().absolute() if rest else None)
    if kind == "imagefolder" and sep and rest:
        return Source("imagefolder", Path(rest).expanduser().absolute())
    raise UserError(f"unknown --source {text!r}: use cifar10, cifar10:PATH or imagefolder:PATH")


@dataclass
class Listing:
    """Everything known about a source before decoding.

    For an image folder, ``paths`` holds one file per image; for CIFAR-10 batches ``images`` holds the
    pixels already (N, 32, 32, 3) uint8. ``source_split[i]`` is ``"train"`` or ``"test"``.
    """

    classes: list[str]
    ids: list[str]
    labels: np.ndarray
    source_split: np.ndarray
    image_shape: tuple[int, int, int]
    paths: list[str] | None = None
    images: np.ndarray | None = None
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def stable_hash(seed: int, key: str) -> int:
    """A 64-bit hash of ``(seed, key)`` that is the same on every machine and Python run."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def stratified_pick(ids: list[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Choose ``round(fraction * n_c)`` items of every class ``c``; returns a boolean mask.

    Within a class, items are ranked by :func:`stable_hash` of their id, so the choice depends only on
    the seed and the ids (not on listing order or platform), and adding files moves few others.
    Every class keeps at least one item on each side when it has two or more.
    """
    labels = np.asarray(labels)
    mask = np.zeros(len(ids), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(round(fraction * len(members)))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        ranked = sorted(members, key=lambda i: stable_hash(seed, ids[i]))
        mask[ranked[:take]] = True
    return mask


# --------------------------------------------------------------------------- image folders


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


# --------------------------------------------------------------------------- CIFAR-10


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_cifar10(cache_dir: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download (once) and extract the official CIFAR-10 archive; returns the batches folder.

    Uses torchvision's downloader; the archive is checked against ``md5`` before extraction, and a
    cached archive that fails the check is downloaded again. Offline, or on a checksum mismatch,
    raises one-line :class:`UserError` that names the offline alternatives.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    cache_dir = Path(cache_dir).expanduser().absolute()
    batches = cache_dir / CIFAR10_DIRNAME
    if (batches / "batches.meta").exists() and all((batches / b).exists() for b in
                                                   (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)):
        return batches
    cache_dir.mkdir(parents=True, exist_ok=True)
    filename = url.rstrip("/").rsplit("/", 1)[-1]
    archive = cache_dir / filename
    offline_hint = ("on a machine without internet use --source imagefolder:PATH (an image folder) or "
                    "--source cifar10:PATH (an extracted cifar-10-batches-py folder or the .tar.gz)")
    if not check_integrity(str(archive), md5):
        archive.unlink(missing_ok=True)
        try:
            download_url(url, str(cache_dir), filename=filename, md5=None)
        except (urllib.error.URLError, OSError, ValueError) as err:
            (cache_dir / filename).unlink(missing_ok=True)
            reason = getattr(err, "reason", None) or err
            raise UserError(f"cannot download CIFAR-10 from {url} ({reason}); {offline_hint}") from None
        if not check_integrity(str(archive), md5):
            got = md5sum(archive)
            archive.unlink(missing_ok=True)
            raise UserError(f"CIFAR-10 archive from {url} failed its checksum (md5 {got}, expected {md5}); "
                            f"try again, or {offline_hint}")
    return extract_cifar10_archive(archive, cache_dir)


def extract_cifar10_archive(archive: Path, dest: Path) -> Path:
    """Extract ``cifar-10-batches-py`` from the official .tar.gz into ``dest`` (atomically)."""
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(CIFAR10_DIRNAME + "/") and m.isfile()]
            if not members:
                raise UserError(f"archive has no {CIFAR10_DIRNAME}/ folder: {archive}")
            tmp = dest / f".{CIFAR10_DIRNAME}.{os.getpid()}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            for member in members:
                member_file = tar.extractfile(member)
                assert member_file is not None
                (tmp / Path(member.name).name).write_bytes(member_file.read())
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"cannot read CIFAR-10 archive {archive}: {err}") from None
    final = dest / CIFAR10_DIRNAME
    if final.exists():
        import shutil

        shutil.rmtree(tmp)
        return final
    os.replace(tmp, final)
    return final


def find_cifar10_batches(path: Path, cache_dir: Path) -> Path:
    """Resolve ``cifar10:PATH``: the batches folder itself, its parent, or the official .tar.gz."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"CIFAR-10 path does not exist: {path}")
    if path.is_file():
        md5 = md5sum(path)
        if md5 != CIFAR10_MD5:
            raise UserError(f"not the official CIFAR-10 archive (md5 {md5}, expected {CIFAR10_MD5}): {path}")
        return extract_cifar10_archive(path, Path(cache_dir).expanduser().absolute())
    if (path / CIFAR10_DIRNAME).is_dir():
        path = path / CIFAR10_DIRNAME
    missing = [name for name in ("batches.meta", *CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
               if not (path / name).is_file()]
    if missing:
        raise UserError(f"not a CIFAR-10 batches folder (missing {', '.join(missing)}): {path}")
    return path


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
        raise UserError(f"cannot read CIFAR-10 batch {path}: {type(err).__name__}: {err}") from None


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _unpickle(path)
    data, labels = raw.get(b"data"), raw.get(b"labels")
    if data is None or labels is None:
        raise UserError(f"CIFAR-10 batch lacks 'data' or 'labels': {path}")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(f"CIFAR-10 batch has data of shape {data.shape} and {len(labels)} labels, "
                        f"expected (N, 3072) and N: {path}")
    # Official layout: each row is 1024 red, then green, then blue values, row-major 32x32.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.asarray(labels, dtype=np.int64)


def load_cifar10_batches(batches: Path) -> Listing:
    """Read the official pickled batches: 50,000 train and 10,000 test images, (N, 32, 32, 3) uint8.

    Records in ``notes["verified"]`` whether every file matches the official checksums.
    """
    meta = _unpickle(batches / "batches.meta")
    names = meta.get(b"label_names")
    if not names:
        raise UserError(f"CIFAR-10 batches.meta lacks 'label_names': {batches / 'batches.meta'}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    images, labels, ids, splits = [], [], [], []
    for split, files in (("train", CIFAR10_TRAIN_BATCHES), ("test", (CIFAR10_TEST_BATCH,))):
        start = 0
        for name in files:
            batch_images, batch_labels = _batch_arrays(batches / name)
            images.append(batch_images)
            labels.append(batch_labels)
            ids.extend(f"{split}/{start + i:05d}" for i in range(len(batch_images)))
            splits.extend([split] * len(batch_images))
            start += len(batch_images)
    all_labels = np.concatenate(labels)
    if all_labels.min() < 0 or all_labels.max() >= len(classes):
        raise UserError(f"CIFAR-10 labels fall outside the {len(classes)} classes of batches.meta: {batches}")
    verified = all(md5sum(batches / name) == md5 for name, md5 in CIFAR10_FILE_MD5.items())
    return Listing(classes=classes, ids=ids, labels=all_labels, source_split=np.asarray(splits, dtype=object),
                   image_shape=(32, 32, 3), images=np.concatenate(images),
                   notes={"layout": "cifar-10-batches-py", "verified": verified, "path": str(batches)})


def list_source(source: Source, cache_dir: Path, test_fraction: float, seed: int) -> Listing:
    """List any source; downloads CIFAR-10 into ``cache_dir`` when no path is given."""
    if source.kind == "imagefolder":
        assert source.path is not None
        return list_image_folder(source.path, test_fraction=test_fraction, seed=seed)
    batches = (find_cifar10_batches(source.path, cache_dir) if source.path is not None
               else download_cifar10(cache_dir))
    return load_cifar10_batches(batches)
