"""Nearest train images of new images or of test images, from the index jobs.evaluate saved.

    python -m jobs.search --run-dir RUN --images a.png b.jpg [--k 5] [--out grid.png]
    python -m jobs.search --run-dir RUN --test-ids test/cat/0001.png,test/dog/0002.png [--model vgg16]
    python -m jobs.search --run-dir RUN --stdin        # one query per line; the model and index stay loaded

Prints each query's neighbours with labels and similarities and draws them as a PNG grid. A few
queries need no cluster: this job runs in the calling process, without Ray (see :mod:`lib.search`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.cli import command_line, run_job
from lib.config import check_ranges, option
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
    stdin: bool = option(False, help="answer queries from standard input, one per line (a test id or an image "
                                     "path), keeping the model and index loaded between them")

    def __post_init__(self) -> None:
        if self.stdin == bool(self.images or self.test_ids) or (self.images and self.test_ids):
            raise UserError("give one of --images, --test-ids or --stdin")
        check_ranges(self, positive=("k",), at_most={"k": 10_000})


def main(cfg: SearchConfig) -> Path | None:
    from lib.paths import RunPaths
    from lib.search import Searcher

    searcher = Searcher(RunPaths.of(cfg.run_dir), cfg.model)
    if cfg.stdin:
        return answer_lines(searcher, cfg.k, sys.stdin)
    names = list(cfg.test_ids or cfg.images)
    if cfg.test_ids:
        images, labels, queries = searcher.test_queries(names)
        similarities, neighbours = searcher.nearest(queries, cfg.k)
    else:
        images, labels = searcher.image_queries(names)
        similarities, neighbours = searcher.search_images(images, cfg.k)
    print_neighbours(searcher, names, labels, similarities, neighbours)
    return draw_grid(cfg, searcher, images, labels, similarities, neighbours)


def print_neighbours(searcher, names, labels, similarities, neighbours) -> None:
    classes, gallery = searcher.classes, searcher.gallery
    for q, name in enumerate(names):
        known = f" ({classes[labels[q]]})" if labels[q] >= 0 else ""
        print(f"query {name}{known}, model {searcher.model}:")
        for rank, (row, similarity) in enumerate(zip(neighbours[q], similarities[q], strict=True), start=1):
            print(f"  {rank}. {gallery.ids[row]}  {classes[gallery.labels[row]]}  similarity {similarity:.4f}")
    sys.stdout.flush()


def answer_lines(searcher, k: int, lines) -> None:
    """One query per line (a test id or an image path); a bad line gets one error line, and the next is read."""
    for line in map(str.strip, lines):
        if not line:
            continue
        started = time.perf_counter()
        try:
            if Path(line).is_file():
                images, labels = searcher.image_queries([line])
                similarities, neighbours = searcher.search_images(images, k)
            else:
                _, labels, queries = searcher.test_queries([line], pixels=False)
                similarities, neighbours = searcher.nearest(queries, k)
        except UserError as err:
            print(f"error: {err}", flush=True)
            continue
        print_neighbours(searcher, [line], labels, similarities, neighbours)
        log(f"answered {line} in {1000 * (time.perf_counter() - started):.0f} ms")


def draw_grid(cfg: SearchConfig, searcher, images, labels, similarities, neighbours) -> Path:
    from lib.plots import retrieval_grid_figure, save_figure

    classes, gallery = searcher.classes, searcher.gallery
    gallery_rows = np.unique(neighbours)
    gallery_images = searcher.data.images_by_id("train", [str(i) for i in gallery.ids[gallery_rows]])
    # an unlabelled query shows as "?": its neighbours' frames then only say "not known to match"
    figure = retrieval_grid_figure(images, np.where(labels >= 0, labels, len(classes)), gallery_images,
                                   gallery.labels[gallery_rows], np.searchsorted(gallery_rows, neighbours),
                                   [*classes, "?"], similarities)
    out = Path(cfg.out).expanduser().absolute() if cfg.out else searcher.run.eval / "search_grid.png"
    if not out.parent.is_dir():
        raise UserError(f"output folder does not exist: {out.parent}")
    save_figure(figure, out)
    log(f"grid of {len(labels)} queries x {cfg.k} neighbours -> {out}")
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
    return run_job(main, SearchConfig, join_image_arguments(argv), prog="jobs.search", console=False)


if __name__ == "__main__":
    sys.exit(command_line(cli))
