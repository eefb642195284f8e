"""Nearest train images of new images or of test images, from the index jobs.evaluate saved.

    python -m jobs.search --run-dir RUN --images a.png b.jpg [--k 5] [--out grid.png]
    python -m jobs.search --run-dir RUN --test-ids test/cat/0001.png,test/dog/0002.png [--model vgg16]

Image files are decoded like jobs.prepare decodes them (RGB, cover-cropped to the stored image
shape), then resized to the model's input size and normalised as in training. Test ids take their
stored embeddings. The default model is the one whose train gallery jobs.evaluate saved
(``RUN/eval/index.faiss``); ``--model NAME`` searches another evaluated model's train embeddings.
A few queries need no cluster: this job runs in the calling process, without Ray.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.runtime import log, run_job
from lib.config import option
from lib.errors import UserError
from lib.io import read_json


@dataclass(frozen=True)
class SearchConfig:
    """Print and draw the nearest train images of image files or test ids."""

    run_dir: str = option(help="run folder that jobs.evaluate completed")
    images: tuple[str, ...] = option((), help="image files to search with (comma- or space-separated)")
    test_ids: tuple[str, ...] = option((), help="ids of test images (as in embeddings.csv) to search with")
    k: int = option(5, help="neighbours per query")
    model: str = option("", help="model to search with (default: the one whose index jobs.evaluate saved)")
    out: str = option("", help="PNG grid of queries and neighbours (default: RUN/eval/search_grid.png)")

    def __post_init__(self) -> None:
        if bool(self.images) == bool(self.test_ids):
            raise UserError("give either --images or --test-ids (one of them)")
        if self.k <= 0:
            raise UserError(f"--k must be positive, got {self.k}")


def load_gallery(run_dir: Path, info: dict, model: str):
    """(index, ids, labels) of ``model``'s train gallery: the saved index, or one built from its embeddings."""
    import faiss
    import pyarrow.parquet as pq

    from jobs.embed import read_embeddings
    from lib.dataset import table_ids
    from lib.retrieval import l2_normalize

    if model == info["model"]:
        rows = pq.read_table(run_dir / "eval" / "index_rows.parquet")
        index = faiss.read_index(str(run_dir / "eval" / "index.faiss"))
        return index, table_ids(rows), rows.column("label").to_numpy()
    if not (run_dir / "embeddings" / model / "train.parquet").is_file():
        known = sorted(p.parent.name for p in (run_dir / "embeddings").glob("*/train.parquet"))
        raise UserError(f"unknown model {model!r} in {run_dir / 'embeddings'} (choose from {', '.join(known)})")
    ids, labels, vectors = read_embeddings(run_dir, model, "train")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(l2_normalize(vectors))
    return index, ids, labels


def image_queries(paths: tuple[str, ...], source: dict, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels (Q, H, W, 3) uint8, labels (Q,), embeddings (Q, D)) of image files; a label is known only when
    the file's folder is named after a class, else -1."""
    from jobs.embed import ModelSource, embed_loop, load_embedding_model
    from lib.dataset import decode_image_file

    if source.get("name") == "stacked" or "backbone" not in source:
        raise UserError("the stacked model cannot embed new images (search it with --test-ids)")
    shape = tuple(info["image_shape"])
    pixels = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"image file not found: {path}")
        try:
            pixels.append(decode_image_file(path, shape)[0])
        except Exception as err:  # noqa: BLE001 - any decoding failure is a bad input file
            raise UserError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
    classes = info["classes"]
    labels = np.array([classes.index(Path(p).parent.name) if Path(p).parent.name in classes else -1 for p in paths])
    fields = {k: source[k] for k in ("name", "backbone", "weights", "embedding_dim", "image_size", "seed", "precision")
              if k in source}
    model_source = ModelSource(**fields)
    images = np.stack(pixels)
    return images, labels, embed_loop(model_source, load_embedding_model(model_source), images, batch_size=64)


def main(cfg: SearchConfig) -> Path:
    from jobs.embed import read_embeddings, read_images_by_id
    from lib.plots import retrieval_grid_figure, save_figure
    from lib.retrieval import l2_normalize

    run_dir = Path(cfg.run_dir).expanduser().absolute()
    if not (run_dir / "eval" / "index.json").is_file() or not (run_dir / "eval" / "index.faiss").is_file():
        raise UserError(f"no saved index in {run_dir / 'eval'}: run jobs.evaluate on this run first")
    info = read_json(run_dir / "eval" / "index.json")
    model = cfg.model or info["model"]
    index, gallery_ids, gallery_labels = load_gallery(run_dir, info, model)
    if cfg.k > index.ntotal:
        raise UserError(f"--k {cfg.k} exceeds the gallery's {index.ntotal} images")
    if cfg.test_ids:
        ids, labels, vectors = read_embeddings(run_dir, model, "test")
        position = {row_id: i for i, row_id in enumerate(ids)}
        unknown = [i for i in cfg.test_ids if i not in position]
        if unknown:
            raise UserError(f"unknown test id {unknown[0]!r} (ids look like {ids[0]!r}; see embeddings.csv)")
        rows = [position[i] for i in cfg.test_ids]
        query_labels, queries = labels[rows], vectors[rows]
        query_images = read_images_by_id(info["data_dir"], "test", list(cfg.test_ids))
        names = list(cfg.test_ids)
    else:
        source = read_json(run_dir / "embeddings" / model / "source.json")
        query_images, query_labels, queries = image_queries(cfg.images, source, info)
        names = list(cfg.images)
    similarities, neighbours = index.search(l2_normalize(queries), cfg.k)
    classes = info["classes"]
    for q, name in enumerate(names):
        known = f" ({classes[query_labels[q]]})" if query_labels[q] >= 0 else ""
        print(f"query {name}{known}, model {model}:")
        for rank, (row, similarity) in enumerate(zip(neighbours[q], similarities[q], strict=True), start=1):
            print(f"  {rank}. {gallery_ids[row]}  {classes[gallery_labels[row]]}  similarity {similarity:.4f}")
    gallery_rows = np.unique(neighbours)
    gallery_images = read_images_by_id(info["data_dir"], "train", [str(i) for i in gallery_ids[gallery_rows]])
    # an unlabelled query shows as "?": its neighbours' frames then only say "not known to match"
    figure = retrieval_grid_figure(query_images, np.where(query_labels >= 0, query_labels, len(classes)),
                                   gallery_images, gallery_labels[gallery_rows],
                                   np.searchsorted(gallery_rows, neighbours), [*classes, "?"], similarities)
    out = Path(cfg.out).expanduser().absolute() if cfg.out else run_dir / "eval" / "search_grid.png"
    if not out.parent.is_dir():
        raise UserError(f"output folder does not exist: {out.parent}")
    save_figure(figure, out)
    log(f"grid of {len(names)} queries x {cfg.k} neighbours -> {out}")
    return out


def join_image_arguments(argv: list[str]) -> list[str]:
    """``--images a.png b.jpg`` -> ``--images a.png,b.jpg``: the config parser takes one comma-separated value."""
    out: list[str] = []
    collecting = False
    for arg in argv:
        if arg == "--images":
            out.append(arg)
            out.append("")
            collecting = True
        elif collecting and not arg.startswith("--"):
            out[-1] = f"{out[-1]},{arg}" if out[-1] else arg
        else:
            collecting = False
            out.append(arg)
    return out


def cli(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_job(main, SearchConfig, join_image_arguments(argv), prog="jobs.search")


if __name__ == "__main__":
    sys.exit(cli())
