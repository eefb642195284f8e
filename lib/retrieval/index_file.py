"""A saved faiss index file checked against what ``index.json`` says of it, before faiss parses it.

faiss's reader trusts the lengths it reads, so a damaged or foreign file can make it allocate without bound or
crash the process. :func:`check_index_file` walks the layout ``faiss.write_index`` gives the three kinds
``jobs.evaluate`` saves (:mod:`lib.retrieval.approximate`) and checks every length against the file's size and the
expected row count and dimension, every stored row id and graph link against the row count, and every vector for
finite values; only then does :func:`read_index_file` hand the file to faiss. Layouts (little-endian, faiss 1.x's
``index_write.cpp``):

- every index starts with a 4-byte tag and a header: d (int32), ntotal (int64), two unused int64, is_trained
  (1 byte), metric (int32); a vector is a uint64 count followed by that many items;
- ``IxFI`` (exact): the header and a vector of ntotal * d float32;
- ``IwFl`` (IVF-Flat): the header, nlist and nprobe (uint64), the coarse quantizer (an ``IxFI`` of nlist rows),
  the direct map (a type byte and a vector of int64), then ``ilar``: nlist and code size (uint64), the list sizes
  (``full``: a vector of nlist uint64; ``sprs``: a vector of (list, size) pairs), then each non-empty list's
  vectors (size * code size bytes) and row ids (size int64);
- ``IHNf`` (HNSW-Flat): the header, the graph (level probabilities: float64 vector; neighbours per level: int32
  vector; each row's level count: int32 vector; each row's first link: uint64 vector of ntotal + 1; the links:
  int32 vector, -1 for none), entry point, top level, efConstruction, efSearch and one unused int32, then its
  vectors as an ``IxFI``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

TAGS = {"exact": b"IxFI", "ivf": b"IwFl", "hnsw": b"IHNf"}
HEADER = struct.Struct("<iqqq?i")
METRIC_INNER_PRODUCT = 0  # faiss.METRIC_INNER_PRODUCT
DIRECT_MAP_NONE = 0


class IndexFileError(ValueError):
    """The file is not the index its description says (the message says what is wrong)."""


class _Reader:
    """Reads typed values and length-prefixed vectors from a memory-mapped file, refusing to read past its end."""

    def __init__(self, data: np.ndarray):
        self.data, self.at = data, 0

    def take(self, size: int, what: str) -> np.ndarray:
        if size < 0 or self.at + size > len(self.data):
            raise IndexFileError(f"truncated: the file ends inside {what}")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def tag(self) -> bytes:
        return self.take(4, "a tag").tobytes()

    def values(self, fmt: str, what: str) -> tuple:
        layout = struct.Struct("<" + fmt)
        return layout.unpack(self.take(layout.size, what).tobytes())

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        kind = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self.take(count * kind.itemsize, what), dtype=kind)

    def vector(self, dtype: str, what: str, expected: int | None = None) -> np.ndarray:
        (count,) = self.values("Q", f"the length of {what}")
        if expected is not None and count != expected:
            raise IndexFileError(f"{what} holds {count} items, expected {expected}")
        return self.array(dtype, count, what)


def _header(reader: _Reader, rows: int, dim: int, what: str) -> None:
    file_dim, file_rows, _, _, trained, metric = reader.values(HEADER.format[1:], f"the header of {what}")
    if metric != METRIC_INNER_PRODUCT:
        raise IndexFileError("not an inner-product index")
    if (file_rows, file_dim) != (rows, dim):
        raise IndexFileError(f"{what} has {file_rows} vectors of {file_dim} dimensions, expected {rows} of {dim}")
    if not trained:
        raise IndexFileError(f"{what} is not trained")


def _finite(vectors: np.ndarray, what: str) -> None:
    # in slices, so that a 5M-row memory map is checked without a 2.5 GB boolean copy
    step = 1 << 24
    for start in range(0, len(vectors), step):
        if not np.isfinite(vectors[start:start + step]).all():
            raise IndexFileError(f"some {what} are not finite")


def _flat(reader: _Reader, rows: int, dim: int, what: str) -> None:
    if reader.tag() != TAGS["exact"]:
        raise IndexFileError(f"{what} is not a faiss exact inner-product index")
    _header(reader, rows, dim, what)
    _finite(reader.vector("f4", what, expected=rows * dim), f"vectors of {what}")


def _ivf(reader: _Reader, rows: int, dim: int, nlist: int) -> None:
    _header(reader, rows, dim, "the index")
    file_nlist, _ = reader.values("QQ", "nlist and nprobe")
    if file_nlist != nlist:
        raise IndexFileError(f"{file_nlist} cells, index.json says {nlist}")
    _flat(reader, nlist, dim, "the coarse quantizer")
    (map_type,) = reader.values("B", "the direct map's type")
    if map_type != DIRECT_MAP_NONE or len(reader.vector("i8", "the direct map")):
        raise IndexFileError("a direct map jobs.evaluate does not write")
    if reader.tag() != b"ilar":
        raise IndexFileError("inverted lists of a kind jobs.evaluate does not write")
    list_count, code_size = reader.values("QQ", "the inverted lists' header")
    if (list_count, code_size) != (nlist, 4 * dim):
        raise IndexFileError(f"{list_count} inverted lists of {code_size}-byte codes, expected {nlist} of {4 * dim}")
    layout = reader.tag()
    if layout == b"full":
        sizes = reader.vector("u8", "the list sizes", expected=nlist).astype(np.int64)
    elif layout == b"sprs":
        pairs = reader.vector("u8", "the list sizes")
        if len(pairs) % 2 or (len(pairs) and pairs[0::2].max() >= nlist):
            raise IndexFileError("sparse list sizes out of range")
        sizes = np.zeros(nlist, np.int64)
        sizes[pairs[0::2].astype(np.int64)] = pairs[1::2].astype(np.int64)
    else:
        raise IndexFileError("inverted list sizes of an unknown layout")
    if sizes.min(initial=0) < 0 or int(sizes.sum()) != rows:
        raise IndexFileError(f"the inverted lists hold {int(sizes.sum())} rows, expected {rows}")
    seen = np.zeros(rows, np.int64)
    for size in sizes[sizes > 0]:
        _finite(reader.array("f4", int(size) * dim, "an inverted list's vectors"), "vectors")
        ids = reader.array("i8", int(size), "an inverted list's row ids")
        if ids.min() < 0 or ids.max() >= rows:
            raise IndexFileError("row ids outside the gallery")
        seen += np.bincount(ids, minlength=rows)
    if (seen != 1).any():
        raise IndexFileError("some gallery rows are missing from the inverted lists or listed twice")


def _hnsw(reader: _Reader, rows: int, dim: int) -> None:
    _header(reader, rows, dim, "the index")
    reader.vector("f8", "the level probabilities")
    per_level = reader.vector("i4", "the neighbours per level").astype(np.int64)
    if len(per_level) < 2 or per_level[0] != 0 or (np.diff(per_level) < 0).any():
        raise IndexFileError("neighbours per level out of order")
    levels = reader.vector("i4", "the rows' levels", expected=rows).astype(np.int64)
    if rows and (levels.min() < 1 or levels.max() >= len(per_level)):
        raise IndexFileError("row levels out of range")
    offsets = reader.vector("u8", "the link offsets", expected=rows + 1).astype(np.int64)
    if offsets[0] != 0 or not np.array_equal(np.diff(offsets), per_level[levels]):
        raise IndexFileError("link offsets do not match the rows' levels")
    links = reader.vector("i4", "the links", expected=int(offsets[-1]))
    if len(links) and (links.min() < -1 or links.max() >= rows):
        raise IndexFileError("graph links outside the gallery")
    entry, top, _, _, _ = reader.values("iiiii", "the graph's entry point")
    if rows and not (0 <= entry < rows and top == levels[entry] - 1):
        raise IndexFileError("the graph's entry point is out of range")
    _flat(reader, rows, dim, "the graph's vectors")


def check_index_file(path: Path, kind: str, rows: int, dim: int, nlist: int | None = None) -> None:
    """Raise :class:`IndexFileError` unless ``path`` is a faiss index of ``kind`` (exact, ivf or hnsw) over
    ``rows`` x ``dim`` finite vectors by inner product, with ``nlist`` cells for ivf, and nothing after it."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except (OSError, ValueError) as err:
        raise IndexFileError(f"unreadable: {getattr(err, 'strerror', None) or err}") from None
    reader = _Reader(data)
    tag = reader.take(4, "the index tag").tobytes() if len(data) >= 4 else b""
    if tag != TAGS[kind]:
        raise IndexFileError(f"not a faiss {_DESCRIPTION[kind]} index")
    if kind == "exact":
        reader.at = 0
        _flat(reader, rows, dim, "the index")
    elif kind == "ivf":
        _ivf(reader, rows, dim, int(nlist or 0))
    else:
        _hnsw(reader, rows, dim)
    if reader.at != len(data):
        raise IndexFileError(f"{len(data) - reader.at} bytes after the index (padded or another file appended)")


_DESCRIPTION = {"exact": "exact inner-product", "ivf": "IVF-Flat inner-product", "hnsw": "HNSW-Flat inner-product"}


def read_index_file(path: Path, kind: str, rows: int, dim: int, nlist: int | None = None) -> Any:
    """The faiss index in ``path``, after :func:`check_index_file` (faiss's reader is data-only: no code runs)."""
    from lib.retrieval.index import faiss

    check_index_file(path, kind, rows, dim, nlist)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise IndexFileError(str(err).strip().splitlines()[-1][:200]) from None
