"""Nearest train images of image files or of test images, from the index ``jobs.evaluate`` saved (no Ray).

Image files are decoded like ``jobs.prepare`` decodes them (RGB, cover-cropped to the stored image
shape), then resized to the model's input size and normalised as in training. Test ids take their
stored embeddings. The default model is the one whose train gallery ``jobs.evaluate`` saved
(``RUN/eval/index.faiss``, of the kind ``RUN/eval/index.json`` names: exact, ivf or hnsw); another evaluated
model's gallery is an exact index built from its train embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lib.embedding import ModelSource, embed_loop, load_embedding_model, read_embeddings
from lib.errors import UserError
from lib.io import read_json
from lib.parquet import read_parquet
from lib.paths import RunPaths


@dataclass
class Gallery:
    """A model's train gallery: a faiss inner-product ``index`` of ``kind`` (exact, ivf, hnsw: see
    :mod:`lib.retrieval.approximate`) and its rows' ``ids`` and ``labels``."""

    model: str
    index: Any
    ids: np.ndarray
    labels: np.ndarray
    kind: str = "exact"


def saved_index_info(run: RunPaths) -> dict[str, Any]:
    """``RUN/eval/index.json``, checked, or a :class:`UserError` when ``jobs.evaluate`` has not saved an index."""
    if not (run.eval / "index.json").is_file() or not (run.eval / "index.faiss").is_file():
        raise UserError(f"no saved index in {run.eval}: run jobs.evaluate on this run first")
    return check_index_info(read_json(run.eval / "index.json"), run.eval / "index.json")


def _not_saved_by_evaluate(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not the index jobs.evaluate saved ({why}): run jobs.evaluate on this run again")


def check_index_info(info: Any, path: Path) -> dict[str, Any]:
    """The fields of ``index.json`` the search reads, each of the type ``jobs.evaluate`` writes."""
    expected = {"model": str, "rows": int, "dim": int, "data_dir": str, "classes": list, "image_shape": list}
    if not isinstance(info, dict):
        raise _not_saved_by_evaluate(path, "not a JSON object")
    for key, kind in expected.items():
        if type(info.get(key)) is not kind:
            raise _not_saved_by_evaluate(path, f"{key!r} missing or not {kind.__name__}")
    if info["rows"] < 1 or info["dim"] < 1:
        raise _not_saved_by_evaluate(path, "rows and dim must be positive")
    if not info["classes"] or not all(isinstance(name, str) for name in info["classes"]):
        raise _not_saved_by_evaluate(path, "classes must be a non-empty list of names")
    if len(info["image_shape"]) != 3 or not all(type(n) is int and n > 0 for n in info["image_shape"]):
        raise _not_saved_by_evaluate(path, "image_shape must be [height, width, channels]")
    return {**info, **check_index_kind(info, path)}


def check_index_kind(info: dict[str, Any], path: Path) -> dict[str, Any]:
    """``type`` and ``parameters`` of ``index.json``: the index kind and the parameters its search needs (an
    ``index.json`` without ``type`` describes an exact index)."""
    from lib.retrieval.approximate import INDEX_KINDS

    kind = info.get("type", "exact")
    if kind not in INDEX_KINDS:
        raise _not_saved_by_evaluate(path, f"type {kind!r} is none of {', '.join(INDEX_KINDS)}")
    parameters = info.get("parameters", {})
    needed = {"ivf": ("nlist", "nprobe"), "hnsw": ("efSearch",)}.get(kind, ())
    if not isinstance(parameters, dict) or not all(type(parameters.get(n)) is int and parameters[n] > 0
                                                   for n in needed):
        raise _not_saved_by_evaluate(path, f"an index of type {kind} needs positive integer parameters "
                                           f"{', '.join(needed)}")
    if kind == "ivf" and parameters["nprobe"] > parameters["nlist"]:
        raise _not_saved_by_evaluate(path, "nprobe exceeds nlist")
    return {"type": kind, "parameters": parameters}


def read_saved_index(path: Path, info: dict[str, Any]) -> Any:
    """The saved faiss index, after checking that it is the kind ``index.json`` names (exact, ivf, hnsw) over
    ``rows`` x ``dim`` finite vectors by inner product (:func:`lib.retrieval.index_file.check_index_file`), with
    its search parameter (``nprobe``, ``efSearch``) set as recorded; anything else is a :class:`UserError` naming
    the file and what is wrong."""
    from lib.retrieval.approximate import SEARCH_PARAMETER, set_search_parameter
    from lib.retrieval.index_file import IndexFileError, read_index_file

    kind, parameters = info["type"], info["parameters"]
    try:
        index = read_index_file(path, kind, info["rows"], info["dim"], parameters.get("nlist"))
    except IndexFileError as err:
        raise _not_saved_by_evaluate(path, str(err)) from None
    if kind in SEARCH_PARAMETER:
        set_search_parameter(index, kind, parameters[SEARCH_PARAMETER[kind]])
    if kind == "ivf":
        index.make_direct_map()  # reconstruct(row): a train id's query vector (Searcher.stored_queries)
    return index


def read_index_rows(path: Path, rows: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) str, labels (N,) int64) of ``index_rows.parquet``, checked against the index's ``rows`` and the
    number of ``classes``."""
    import pyarrow as pa

    from lib.data.reader import table_ids

    try:
        table = read_parquet(path)
    except (OSError, pa.ArrowException) as err:
        raise _not_saved_by_evaluate(path, f"not readable as Parquet: {str(err).splitlines()[0][:200]}") from None
    for column, check in (("id", pa.types.is_string), ("label", pa.types.is_integer)):
        if column not in table.column_names or not check(table.schema.field(column).type):
            raise _not_saved_by_evaluate(path, f"no {column!r} column of {'text' if column == 'id' else 'integers'}")
    if table.num_rows != rows:
        raise _not_saved_by_evaluate(path, f"{table.num_rows} rows, the index has {rows}")
    if table.column("id").null_count or table.column("label").null_count:
        raise _not_saved_by_evaluate(path, "empty ids or labels")
    labels = table.column("label").to_numpy().astype(np.int64)
    if labels.min() < 0 or labels.max() >= classes:
        raise _not_saved_by_evaluate(path, f"labels outside the {classes} classes")
    return table_ids(table), labels


def model_dim(run: RunPaths, model: str) -> int:
    """The embedding dimension of ``model``'s stored test embeddings (what a query by test id searches with)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = run.embeddings(model) / "test.parquet"
    try:
        kind = pq.read_schema(path).field("embedding").type
    except (OSError, KeyError, pa.ArrowException):
        raise UserError(f"no readable embeddings of model {model!r} at {path} (run jobs.evaluate)") from None
    if not pa.types.is_fixed_size_list(kind):
        raise UserError(f"{path}: the embedding column is not a fixed-size list (run jobs.evaluate)")
    return kind.list_size


def load_gallery(run: RunPaths, info: dict[str, Any], model: str) -> Gallery:
    """``model``'s train gallery: the saved index (of the kind ``index.json`` names), or an exact one built from
    another model's stored train embeddings.

    The saved index is checked against ``index.json``, its rows file and the model before it is used: its
    kind, count and dimension, and every row's label (:func:`read_saved_index`, :func:`read_index_rows`).
    """
    from lib.retrieval.index import faiss, l2_normalize

    if model == info["model"]:
        ids, labels = read_index_rows(run.eval / "index_rows.parquet", info["rows"], len(info["classes"]))
        dim = model_dim(run, model)
        if dim != info["dim"]:
            raise _not_saved_by_evaluate(run.eval / "index.json", f"{info['dim']} dimensions, the {model} "
                                                                  f"model's embeddings have {dim}")
        index = read_saved_index(run.eval / "index.faiss", info)
        return Gallery(model, index, ids, labels, info["type"])
    if not (run.embeddings(model) / "train.parquet").is_file():
        known = sorted(p.parent.name for p in run.embeddings_root.glob("*/train.parquet"))
        raise UserError(f"unknown model {model!r} in {run.embeddings_root} (choose from {', '.join(known)})")
    train = read_embeddings(run.root, model, "train")
    index = faiss.IndexFlatIP(train.vectors.shape[1])
    index.add(l2_normalize(train.vectors))
    return Gallery(model, index, train.ids, train.labels)


def check_saved_gallery(run: RunPaths, model: str = "") -> None:
    """Everything a search service loads at its start, checked now (``jobs.serve`` calls it before Ray): the
    saved index and its rows, and the model's gallery; a :class:`UserError` names the first file at fault."""
    info = saved_index_info(run)
    load_gallery(run, info, model or info["model"])


# The most pixels a query image may have: the service's default upload limit (onray.serve.GallerySettings), so
# jobs.search refuses what the service refuses, from the file's header, before PIL warns of or decodes a bomb.
MAX_QUERY_PIXELS = 40_000_000


def check_image_pixels(path: str, max_pixels: int = MAX_QUERY_PIXELS) -> None:
    """A :class:`UserError` naming ``path`` when its header says it has more than ``max_pixels`` pixels (a file
    PIL cannot open at all is left to the decoder's own error)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise UserError(f"image {path} has more pixels than PIL decodes (limit {max_pixels})") from None
    except Exception:  # noqa: BLE001 - not an image: decode_image says so in its own words
        return
    if width * height > max_pixels:
        raise UserError(f"image {path} is {width}x{height} pixels, more than the {max_pixels} a search decodes")


class Searcher:
    """One model's train gallery, kept loaded between queries (the model, the index, the test embeddings),
    so every query after the first costs milliseconds, not the seconds of imports and loading."""

    def __init__(self, run: RunPaths, model: str = "", device: str = "cpu"):
        from lib.data.reader import PreparedData

        self.device = device  # where the network embeds uploaded images ("cuda" in a GPU replica)
        self.run, self.info = run, saved_index_info(run)
        self.model = model or self.info["model"]
        self.gallery = load_gallery(run, self.info, self.model)
        self.data = PreparedData.open(self.info["data_dir"])
        self.classes: list[str] = self.info["classes"]
        self._network = None
        self._gallery_rows: dict[str, int] | None = None
        self._test: tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]] | None = None

    def test_embeddings(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids (N,), labels (N,), embeddings (N, D)) of the model's test split, read once."""
        if self._test is None:
            test = read_embeddings(self.run.root, self.model, "test")
            self._test = (test.ids, test.labels, test.vectors, {row_id: i for i, row_id in enumerate(test.ids)})
        return self._test[:3]

    def test_queries(self, ids: list[str], pixels: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(pixels, labels, embeddings) of test images by id, from their stored embeddings (``pixels=False``: None
        for the pixels, which only a picture needs)."""
        test_ids, labels, vectors = self.test_embeddings()
        position = self._test[3]
        unknown = [i for i in ids if i not in position]
        if unknown:
            raise UserError(f"unknown test id {unknown[0]!r} (ids look like {test_ids[0]!r}; see embeddings.csv)")
        rows = [position[i] for i in ids]
        return self.data.images_by_id("test", list(ids)) if pixels else None, labels[rows], vectors[rows]

    def stored_queries(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels (Q,), embeddings (Q, D), own gallery rows (Q,), -1 for none) of stored images by id: a test
        id takes its stored test embedding, a train id its own row of the gallery (which a search then leaves
        out of the neighbours, like protocol L leaves out the query)."""
        if self._gallery_rows is None:
            self._gallery_rows = {str(row_id): row for row, row_id in enumerate(self.gallery.ids)}
        test = [i for i in ids if i not in self._gallery_rows]
        _, test_labels, test_vectors = self.test_queries(test, pixels=False) if test else (None, [], [])
        labels, vectors, rows, next_test = [], [], [], iter(zip(test_labels, test_vectors, strict=True))
        for row_id in ids:
            if row_id in self._gallery_rows:
                row = self._gallery_rows[row_id]
                labels.append(self.gallery.labels[row])
                vectors.append(self.gallery.index.reconstruct(row))
                rows.append(row)
            else:
                label, vector = next(next_test)
                labels.append(label)
                vectors.append(vector)
                rows.append(-1)
        return np.asarray(labels, dtype=np.int64), np.stack(vectors).astype(np.float32), np.asarray(rows)

    def image_queries(self, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pixels (Q, H, W, 3) uint8, labels (Q,)) of image files, decoded like jobs.prepare; a label is known
        only when the file's folder is named after a class, else -1. :meth:`search_images` embeds them."""
        pixels = []
        for path in paths:
            if not Path(path).is_file():
                raise UserError(f"image file not found: {path}")
            check_image_pixels(path)
            pixels.append(self.decode_image(path, name=path))
        labels = np.array([self.classes.index(Path(p).parent.name) if Path(p).parent.name in self.classes else -1
                           for p in paths])
        return np.stack(pixels), labels

    def decode_image(self, file: str | BinaryIO, name: str) -> np.ndarray:
        """One image file (a path or an open binary file) -> (H, W, 3) uint8 of the stored image shape, decoded
        like jobs.prepare (RGB, cover-cropped); a :class:`UserError` naming ``name`` when it is not an image."""
        from lib.data.images import decode_image_file

        try:
            return decode_image_file(file, tuple(self.info["image_shape"]))[0]
        except Exception as err:  # noqa: BLE001 - any decoding failure is a bad input file
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            raise UserError(f"cannot read image {name}: {reason}") from None

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(Q, H, W, 3) uint8 -> (Q, D) float32 with this model's network (loaded on first use), in one batch
        of up to 64 images at a time, as in jobs.evaluate."""
        source, network = self.load_network()
        return embed_loop(source, network, images, batch_size=64, device=self.device)

    def load_network(self) -> tuple[ModelSource, Any]:
        """The model's (source, network), loaded on first use; a :class:`UserError` for a model without one."""
        if self._network is None:
            source = ModelSource.recorded(read_json(self.run.embeddings(self.model) / "source.json"))
            if source is None:
                raise UserError(f"the {self.model} model cannot embed new images (search it with test ids)")
            self._network = (source, load_embedding_model(source, self.device))
        return self._network

    def search_images(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The one path from pixels to neighbours (jobs.search and the Serve app both take it): embed
        (Q, H, W, 3) uint8 images and return (similarities (Q, k), gallery rows (Q, k)) of :meth:`nearest`."""
        return self.nearest(self.embed(images), k)

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (Q, k), gallery rows (Q, k)) of the ``k`` nearest gallery images of each query."""
        from lib.retrieval.approximate import search_full
        from lib.retrieval.index import l2_normalize

        if k > self.gallery.index.ntotal:
            raise UserError(f"--k {k} exceeds the gallery's {self.gallery.index.ntotal} images")
        return search_full(self.gallery.index, self.gallery.kind, l2_normalize(queries), k)
