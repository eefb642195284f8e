"""What the run gallery (``jobs.serve``) shows, without Ray: a run's overview for the page, its embedding map
(``RUN/eval/map.json``, checked before it is served), stored images as PNG by id, and the checks an uploaded
file passes before it is decoded.

The Serve app (:mod:`onray.serve`) turns these into HTTP answers; the searching itself is
:class:`lib.search.Searcher`'s, the same as ``jobs.search``'s.
"""

from __future__ import annotations

import io
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from lib.data.reader import SPLITS, PreparedData
from lib.errors import UserError
from lib.parquet import read_parquet
from lib.paths import RunPaths

# RUN/eval pictures the page shows, in its order; loss curves are loss_curve_<backbone>.png
FIGURES = ("tsne.png", "clusters.png", "retrieval_grid.png")
FIGURE_NAME = re.compile(r"(tsne|clusters|retrieval_grid|loss_curve_[A-Za-z0-9_.-]+)\.png")


class UploadTooLarge(UserError):
    """An upload over the byte or pixel limit (HTTP 413)."""


class UnknownImage(UserError):
    """An image id that no split holds (HTTP 404)."""


class NoMap(UnknownImage):
    """A run without a usable ``map.json`` (HTTP 404): missing, or not the layout :func:`lib.report.tsne_map_document`
    writes."""


MAP_KEYS = ("model", "classes", "clusters", "id", "x", "y", "label", "cluster")


def read_tsne_map(run: RunPaths) -> dict[str, Any]:
    """``RUN/eval/map.json`` as data, after checking its layout (lib.report's): every column a list of the same
    length, ids strings, coordinates finite numbers, labels indexes into ``classes``, clusters in [0, clusters)."""
    path = run.eval / "map.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NoMap(f"no map.json in {run.eval} (jobs.evaluate writes it)") from None
    except (OSError, ValueError) as err:
        raise NoMap(f"{path} is not readable JSON: {type(err).__name__}") from None

    def refuse(reason: str) -> NoMap:
        return NoMap(f"{path} is not an embedding map: {reason}")

    if not isinstance(document, dict) or sorted(document) != sorted(MAP_KEYS):
        raise refuse(f"expected the keys {', '.join(MAP_KEYS)}")
    classes, clusters = document["classes"], document["clusters"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise refuse("classes must be a list of names")
    if not isinstance(document["model"], str) or type(clusters) is not int or clusters < 0:
        raise refuse("model must be a name and clusters a count")
    columns = {key: document[key] for key in ("id", "x", "y", "label", "cluster")}
    if not all(isinstance(column, list) for column in columns.values()) or len({len(c) for c in columns.values()}) != 1:
        raise refuse("id, x, y, label and cluster must be lists of one length")

    def coordinate(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))

    checks = {"id": (lambda v: isinstance(v, str), "a string"), "x": (coordinate, "a finite number"),
              "y": (coordinate, "a finite number"),
              "label": (lambda v: type(v) is int and 0 <= v < len(classes), f"a class index below {len(classes)}"),
              "cluster": (lambda v: type(v) is int and 0 <= v < clusters, f"a cluster below {clusters}")}
    for key, (check, what) in checks.items():
        bad = next((row for row, value in enumerate(columns[key]) if not check(value)), None)
        if bad is not None:
            raise refuse(f"{key}[{bad}] = {str(columns[key][bad])[:40]!r} is not {what}")
    return document


def check_upload(data: bytes, max_bytes: int, max_pixels: int) -> None:
    """Refuse an upload before decoding it: empty, over ``max_bytes``, not an image PIL recognises, or an
    image of more than ``max_pixels`` (read from its header, so a decompression bomb is never decoded)."""
    from PIL import Image

    if not data:
        raise UserError("the uploaded file is empty")
    if len(data) > max_bytes:
        raise UploadTooLarge(f"the upload has {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:  # PIL's own limit, far above ours: opening already refuses
        raise UploadTooLarge(f"the image is too large to decode: {err}".splitlines()[0]) from None
    except Exception as err:  # noqa: BLE001 - whatever PIL says, the upload is not an image it can read
        raise UserError(f"the upload is not an image ({type(err).__name__})") from None
    if width * height > max_pixels:
        raise UploadTooLarge(f"the image is {width}x{height} pixels, more than the limit of {max_pixels}")


class ImageStore:
    """Stored images by id, as PNG: an id -> (file, row) map from the id columns of every split (no pixels
    read), and the pixels of the few Parquet files last asked for (a file holds up to 2,500 images)."""

    def __init__(self, data: PreparedData, cached_files: int = 4):
        self.data = data
        self.cached_files = cached_files
        self._where: dict[str, tuple[str, int]] | None = None
        self._files: OrderedDict[str, np.ndarray] = OrderedDict()

    def _locate(self, image_id: str) -> tuple[str, int]:
        if self._where is None:

            self._where = {}
            for split in SPLITS:
                for path in self.data.files(split):
                    ids = read_parquet(path, columns=["id"]).column("id").to_pylist()
                    self._where.update((row_id, (path, row)) for row, row_id in enumerate(ids))
        if image_id not in self._where:
            raise UnknownImage(f"no image with id {image_id!r} in {self.data.root}")
        return self._where[image_id]

    def pixels(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 of a stored image."""

        from lib.data.reader import table_images

        path, row = self._locate(image_id)
        if path not in self._files:
            self._files[path] = table_images(read_parquet(path, columns=["image"]))
            while len(self._files) > self.cached_files:
                self._files.popitem(last=False)
        self._files.move_to_end(path)
        return self._files[path][row]

    def png(self, image_id: str) -> bytes:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(self.pixels(image_id)).save(out, format="PNG")
        return out.getvalue()


def figure_path(run: RunPaths, name: str) -> Path:
    """``RUN/eval/<name>`` for a picture the page shows (only those names: nothing else of RUN is served)."""
    path = run.eval / name
    if not FIGURE_NAME.fullmatch(name) or not path.is_file():
        raise UnknownImage(f"no figure {name!r} in {run.eval}")
    return path


def searchable_models(run: RunPaths) -> dict[str, bool]:
    """Models with stored train and test embeddings -> whether their network can embed an upload
    (``stacked`` is searched by test id only)."""
    models = {}
    for folder in sorted(p for p in run.embeddings_root.glob("*") if p.is_dir()):
        if all((folder / f"{split}.parquet").is_file() for split in ("train", "test")):
            try:
                source = json.loads((folder / "source.json").read_text())
            except (OSError, ValueError):
                continue
            models[folder.name] = isinstance(source.get("model"), dict)
    return models


def run_overview(run: RunPaths, default_model: str, classes: list[str], test_ids: np.ndarray,
                 test_labels: np.ndarray, queries: int = 12, seed: int = 0) -> dict[str, Any]:
    """What the page shows of a run: its metrics (``metrics.json``), the models it can search with, the
    pictures in RUN/eval, and ``queries`` test ids (the classes in turn, seeded) for the query grid."""
    from lib.report import grid_query_rows

    try:
        metrics = json.loads((run.eval / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {"models": {}, "clusters": {}}
    loss_curves = sorted(p.name for p in run.eval.glob("loss_curve_*.png"))
    return {
        "run": str(run.root),
        "default_model": default_model,
        "models": searchable_models(run),
        "metrics": {"models": metrics.get("models", {}), "clusters": metrics.get("clusters", {})},
        "classes": classes,
        "figures": [name for name in (*loss_curves, *FIGURES) if (run.eval / name).is_file()],
        "queries": [str(test_ids[row]) for row in grid_query_rows(test_labels, queries, seed)],
    }
