"""Nearest train images of new images or of test images, from the index jobs.evaluate saved.

    python -m jobs.search --run-dir RUN --images a.png b.jpg [--k 5] [--out grid.png]
    python -m jobs.search --run-dir RUN --test-ids test/cat/0001.png,test/dog/0002.png [--model vgg16]

Prints each query's neighbours with labels and similarities and draws them as a PNG grid. A few
queries need no cluster: this job runs in the calling process, without Ray (see :mod:`lib.search`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.cli import run_job
from lib.config import option
from lib.console import log
from lib.errors import UserError


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


def main(cfg: SearchConfig) -> Path:
    from lib.dataset import PreparedData
    from lib.embedding import read_embeddings
    from lib.paths import RunPaths
    from lib.plots import retrieval_grid_figure, save_figure
    from lib.search import embed_image_files, load_gallery, nearest, saved_index_info

    run = RunPaths.of(cfg.run_dir)
    info = saved_index_info(run)
    model = cfg.model or info["model"]
    gallery = load_gallery(run, info, model)
    data = PreparedData.open(info["data_dir"])
    if cfg.test_ids:
        ids, labels, vectors = read_embeddings(run.root, model, "test")
        position = {row_id: i for i, row_id in enumerate(ids)}
        unknown = [i for i in cfg.test_ids if i not in position]
        if unknown:
            raise UserError(f"unknown test id {unknown[0]!r} (ids look like {ids[0]!r}; see embeddings.csv)")
        rows = [position[i] for i in cfg.test_ids]
        query_labels, queries = labels[rows], vectors[rows]
        query_images = data.images_by_id("test", list(cfg.test_ids))
        names = list(cfg.test_ids)
    else:
        query_images, query_labels, queries = embed_image_files(run, model, cfg.images, info)
        names = list(cfg.images)
    similarities, neighbours = nearest(gallery, queries, cfg.k)
    classes = info["classes"]
    for q, name in enumerate(names):
        known = f" ({classes[query_labels[q]]})" if query_labels[q] >= 0 else ""
        print(f"query {name}{known}, model {model}:")
        for rank, (row, similarity) in enumerate(zip(neighbours[q], similarities[q], strict=True), start=1):
            print(f"  {rank}. {gallery.ids[row]}  {classes[gallery.labels[row]]}  similarity {similarity:.4f}")
    gallery_rows = np.unique(neighbours)
    gallery_images = data.images_by_id("train", [str(i) for i in gallery.ids[gallery_rows]])
    # an unlabelled query shows as "?": its neighbours' frames then only say "not known to match"
    figure = retrieval_grid_figure(query_images, np.where(query_labels >= 0, query_labels, len(classes)),
                                   gallery_images, gallery.labels[gallery_rows],
                                   np.searchsorted(gallery_rows, neighbours), [*classes, "?"], similarities)
    out = Path(cfg.out).expanduser().absolute() if cfg.out else run.eval / "search_grid.png"
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
