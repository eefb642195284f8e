"""Nearest train images of image files or of test images, from the index ``jobs.evaluate`` saved (no Ray).

Image files are decoded like ``jobs.prepare`` decodes them (RGB, cover-cropped to the stored image
shape), then resized to the model's input size and normalised as in training. Test ids take their
stored embeddings. The default model is the one whose train gallery ``jobs.evaluate`` saved
(``RUN/eval/index.faiss``); another evaluated model's gallery is built from its train embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lib.embedding import ModelSource, embed_loop, load_embedding_model, read_embeddings
from lib.errors import UserError
from lib.io import read_json
from lib.paths import RunPaths


@dataclass
class Gallery:
    """A model's train gallery: a faiss inner-product ``index`` and its rows' ``ids`` and ``labels``."""

    model: str
    index: Any
    ids: np.ndarray
    labels: np.ndarray


def saved_index_info(run: RunPaths) -> dict[str, Any]:
    """``RUN/eval/index.json``, or a :class:`UserError` when ``jobs.evaluate`` has not saved an index."""
    if not (run.eval / "index.json").is_file() or not (run.eval / "index.faiss").is_file():
        raise UserError(f"no saved index in {run.eval}: run jobs.evaluate on this run first")
    return read_json(run.eval / "index.json")


def load_gallery(run: RunPaths, info: dict[str, Any], model: str) -> Gallery:
    """``model``'s train gallery: the saved index, or one built from the model's stored train embeddings."""
    import pyarrow.parquet as pq

    from lib.data.reader import table_ids
    from lib.retrieval.index import faiss, l2_normalize

    if model == info["model"]:
        rows = pq.read_table(run.eval / "index_rows.parquet")
        index = faiss.read_index(str(run.eval / "index.faiss"))
        return Gallery(model, index, table_ids(rows), rows.column("label").to_numpy())
    if not (run.embeddings(model) / "train.parquet").is_file():
        known = sorted(p.parent.name for p in run.embeddings_root.glob("*/train.parquet"))
        raise UserError(f"unknown model {model!r} in {run.embeddings_root} (choose from {', '.join(known)})")
    train = read_embeddings(run.root, model, "train")
    index = faiss.IndexFlatIP(train.vectors.shape[1])
    index.add(l2_normalize(train.vectors))
    return Gallery(model, index, train.ids, train.labels)


class Searcher:
    """One model's train gallery, kept loaded between queries (the model, the index, the test embeddings),
    so every query after the first costs milliseconds, not the seconds of imports and loading."""

    def __init__(self, run: RunPaths, model: str = ""):
        from lib.data.reader import PreparedData

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
        return embed_loop(source, network, images, batch_size=64)

    def load_network(self) -> tuple[ModelSource, Any]:
        """The model's (source, network), loaded on first use; a :class:`UserError` for a model without one."""
        if self._network is None:
            source = ModelSource.recorded(read_json(self.run.embeddings(self.model) / "source.json"))
            if source is None:
                raise UserError(f"the {self.model} model cannot embed new images (search it with test ids)")
            self._network = (source, load_embedding_model(source))
        return self._network

    def search_images(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The one path from pixels to neighbours (jobs.search and the Serve app both take it): embed
        (Q, H, W, 3) uint8 images and return (similarities (Q, k), gallery rows (Q, k)) of :meth:`nearest`."""
        return self.nearest(self.embed(images), k)

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (Q, k), gallery rows (Q, k)) of the ``k`` nearest gallery images of each query."""
        from lib.retrieval.index import l2_normalize

        if k > self.gallery.index.ntotal:
            raise UserError(f"--k {k} exceeds the gallery's {self.gallery.index.ntotal} images")
        return self.gallery.index.search(l2_normalize(queries), k)
