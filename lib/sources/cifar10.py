"""CIFAR-10 in its official format: download, checksum, extract and read the pickled batches.

``--source cifar10`` downloads the official archive into the cache; ``cifar10:PATH`` reads an extracted
``cifar-10-batches-py`` folder (or its parent) or the official ``.tar.gz`` on the local disk. The batches are
pickles: they are read by a restricted unpickler that refuses every global but numpy's array reconstruction.
The listing holds the pixels, so nothing is decoded later.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import UserError
from lib.io import staging_dir
from lib.sources.location import Location, parse_location
from lib.sources.registry import DataSource, Listing, ListOptions, register_source

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


@register_source("cifar10")
@dataclass(frozen=True)
class Cifar10Source(DataSource):
    """``cifar10`` (downloaded into the cache, checksum-verified) or ``cifar10:PATH`` (a local copy)."""

    location: Location | None = None
    forms = ("cifar10", "cifar10:PATH")

    @classmethod
    def parse(cls, argument: str | None) -> Cifar10Source:
        return cls(parse_location(argument) if argument and argument.strip() else None)

    def list_images(self, options: ListOptions) -> Listing:
        if self.location is None:
            return load_cifar10_batches(download_cifar10(options.cache_dir))
        if self.location.is_uri:
            raise UserError(f"--source cifar10:PATH reads a local folder or archive, not {self.location}; copy it "
                            f"to this machine, or use --source imagefolder:{self.location} for an image folder")
        return load_cifar10_batches(find_cifar10_batches(Path(self.location.text), options.cache_dir))

    def __str__(self) -> str:
        return "cifar10" if self.location is None else f"cifar10:{self.location}"


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
            dest.mkdir(parents=True, exist_ok=True)
            tmp = staging_dir(dest, CIFAR10_DIRNAME)
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


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


# The only globals a CIFAR-10 batch names: numpy's array reconstruction. The official files (pickled by
# Python 2 with numpy 1) name numpy.core.*; a batch written by numpy 2 names numpy._core.*; protocol 5
# rebuilds arrays from a buffer. Dicts, lists, bytes, str and ints need no global at all.
_BATCH_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: any global outside :data:`_BATCH_GLOBALS` is refused
    before it is imported, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _BATCH_GLOBALS.get((module, name))
        if resolve is None:
            raise _RefusedGlobal(module, name)
        return resolve()


def _unpickle(path: Path) -> dict:
    """Load one official CIFAR-10 pickle (``batches.meta``, ``data_batch_*``, ``test_batch``) safely.

    Only numpy array reconstruction is allowed; a file that asks for anything else (``os.system``,
    ``builtins.exec``, ...) raises :class:`UserError` without running it, as does a damaged file.
    """
    try:
        with open(path, "rb") as handle:
            raw = _BatchUnpickler(handle, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise UserError(f"refusing to load {path}: it asks to run {err.qualified}, which a CIFAR-10 batch "
                        f"never does (use the official cifar-10-batches-py files)") from None
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
        detail = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"cannot read CIFAR-10 batch {path} (damaged or not a CIFAR-10 pickle): "
                        f"{type(err).__name__}{': ' + detail if detail else ''}") from None
    if not isinstance(raw, dict):
        raise UserError(f"not a CIFAR-10 batch (holds a {type(raw).__name__}, not a dict): {path}")
    return raw


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _unpickle(path)
    data, labels = raw.get(b"data"), raw.get(b"labels")
    if data is None or labels is None:
        raise UserError(f"CIFAR-10 batch lacks 'data' or 'labels': {path}")
    try:
        data, labels = np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise UserError(f"CIFAR-10 batch holds data or labels that are not integer arrays ({err}): {path}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or len(labels) != len(data):
        raise UserError(f"CIFAR-10 batch has data of shape {data.shape} and labels of shape {labels.shape}, "
                        f"expected (N, 3072) and (N,): {path}")
    # Official layout: each row is 1024 red, then green, then blue values, row-major 32x32.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def load_cifar10_batches(batches: Path) -> Listing:
    """Read the official pickled batches: 50,000 train and 10,000 test images, (N, 32, 32, 3) uint8.

    Records in ``notes["verified"]`` whether every file matches the official checksums.
    """
    meta = _unpickle(batches / "batches.meta")
    names = meta.get(b"label_names")
    if not names or not isinstance(names, (list, tuple)):
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
