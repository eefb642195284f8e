"""``jobs.evaluate`` without Ray: its config, and scoring, stacking, clustering, pictures and the saved index
over embeddings already in the store (:mod:`lib.embedding`). The Ray side is :mod:`onray.evaluate`.

Outputs in ``RUN/eval/``: ``results.md``, ``tsne.png``, ``clusters.png``, ``map.json`` (the same map as data, for
the page), ``retrieval_grid.png``,
``loss_curve_<backbone>.png``, ``embeddings.csv`` (test rows), ``index.faiss`` + ``index_rows.parquet`` +
``index.json`` (the best single network's train gallery, for jobs.search and jobs.serve; exact or approximate
by ``--index``) and, last, ``metrics.json``
(lib.report layout).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lib.config import check_ranges, fields_from, option
from lib.console import detail, log
from lib.data.reader import SPLITS, PreparedData
from lib.devices import USE_GPU_HELP, UseGpu
from lib.embedding import ModelSource, SplitEmbeddings, trained_config, write_split
from lib.errors import UserError
from lib.io import atomic_path, read_json, write_json
from lib.parquet import write_parquet
from lib.paths import RunPaths
from lib.precision import PRECISION_HELP, Precision
from lib.report import STACKED, grid_query_rows, model_entry, seeded_subset, tsne_map_document, write_tsne_map
from lib.retrieval.approximate import INDEX_HELP, IndexChoice
from lib.training import TrainConfig

OUTPUTS = ("results.md", "tsne.png", "clusters.png", "map.json", "retrieval_grid.png", "embeddings.csv", "index.faiss",
           "index_rows.parquet", "index.json", "near_duplicates.parquet", "near_duplicates.png")
# metrics.json key of protocol G scored without the test queries that have a near-duplicate in train
G_CLEAN = "G_without_near_duplicates"
TSNE_THREADED_FROM = 5000  # points



@dataclass(frozen=True)
class Splits:
    """One model's embeddings of every split (the stacked embedding's too)."""

    train: SplitEmbeddings
    val: SplitEmbeddings
    test: SplitEmbeddings

    def of(self, split: str) -> SplitEmbeddings:
        """The split named ``split`` (one of :data:`lib.data.reader.SPLITS`)."""
        return {"train": self.train, "val": self.val, "test": self.test}[split]


@dataclass(frozen=True)
@fields_from(TrainConfig, ("mlflow",), heading="experiment tracking (as jobs.train's)")
class EvaluateConfig:
    """Embed every split with each model on Ray Data; score retrieval, probes, clusters and stacking."""

    data_dir: str = option(help="prepared data set (jobs.prepare's DATA)")
    run_dir: str = option(help="run folder: models from RUN/models, output to RUN/embeddings and RUN/eval")
    backbones: tuple[str, ...] = option((), help="only these backbones (default: every trained one); one "
                                                 "without a trained model is evaluated untrained (--weights)")
    include_untrained: bool = option(False, help="also evaluate each trained backbone's untrained network")
    weights: str = option("none", help="initial weights of --backbones without a trained model: none "
                                       "(seeded random), imagenet or PATH")
    embedding_dim: int = option(128, help="embedding size D of untrained networks without a training config")
    image_size: int = option(32, help="input side of untrained networks without a training config")
    batch_size: int = option(256, help="images per inference batch")
    num_actors: int = option(0, help="embedding actors (0: one per GPU, else one per core, up to 8 per node)")
    use_gpu: UseGpu = option("auto", help=USE_GPU_HELP + " (embedding actors; faiss uses a GPU when its build has one)")
    precision: Precision = option("auto", help=PRECISION_HELP)
    tsne_points: int = option(10000, help="test points in the t-SNE and cluster maps and the page's map.json "
                                          "(a seeded subset)")
    grid_queries: int = option(10, help="test queries in retrieval_grid.png, the classes in turn (10: each class of "
                                        "CIFAR-10 once)")
    grid_k: int = option(8, help="train neighbours per query in retrieval_grid.png")
    csv_rows: int = option(2000, help="test rows per model in embeddings.csv (a seeded subset; 0 = all)")
    stack_projection: Literal["lda", "pca"] = option("lda", help="stacked embedding's projection (fit on train+val)")
    seed: int = option(0, help="seed of untrained networks, subsets, K-Means and t-SNE")
    index: IndexChoice = option("auto", help=INDEX_HELP)
    index_recall: float = option(0.95, help="recall@5 an ivf or hnsw index is tuned to reach on the val queries "
                                            "(its nprobe or efSearch); its recall on the test queries is recorded "
                                            "in RUN/eval/index.json")
    near_duplicate_threshold: float = option(0.95, help="a test image whose nearest train image has at least this "
                                                        "pixel-signature cosine similarity is a near-duplicate "
                                                        "(lib.duplicates); protocol G is also scored without them")

    def __post_init__(self) -> None:
        from lib.backbones import check_backbones

        if not 0.0 < self.index_recall <= 1.0:
            raise UserError(f"--index-recall must be in (0, 1], got {self.index_recall}")
        if not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise UserError(f"--near-duplicate-threshold must be in (0, 1], got {self.near_duplicate_threshold}")

        if self.backbones:
            check_backbones(self.backbones)
        check_ranges(self, positive=("embedding_dim", "image_size", "batch_size", "grid_queries", "grid_k",
                                     "tsne_points"),
                     non_negative=("num_actors", "csv_rows", "seed"))

    @property
    def faiss_use_gpu(self) -> str:
        """``--use-gpu true`` insists on GPUs for the embedding actors; faiss takes one only when its build has one."""
        return "false" if self.use_gpu == "false" else "auto"


def finished(out: Path, config: dict) -> bool:
    try:
        recorded = json.loads((out / "metrics.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == config and all((out / name).is_file() for name in OUTPUTS)


def describe_weights(run: RunPaths, source: ModelSource) -> str:
    if source.trained:
        config = trained_config(run, source.backbone)
        return (f"trained, preset {config.preset}, initial weights {config.weights}, "
                f"{config.image_size} px, D={config.embedding_dim}")
    weights = source.weights if source.weights in ("none", "imagenet") else Path(source.weights).name
    return f"untrained, weights {weights}, {source.image_size} px, D={source.embedding_dim}"


def check_aligned(embeddings: dict[str, Splits], run: RunPaths) -> None:
    """Every model's split must hold the same ids in the same order (stacking compares rows)."""
    first = next(iter(embeddings))
    for name, splits in embeddings.items():
        for split in SPLITS:
            if not np.array_equal(splits.of(split).ids, embeddings[first].of(split).ids):
                raise UserError(f"embeddings of {name} and {first} cover different {split} images; "
                                f"delete {run.embeddings(name)} and rerun")


def stacked_model(cfg: EvaluateConfig, embeddings: dict[str, Splits], names: list[str]) -> tuple[Splits, dict]:
    """The stacked embedding (projection fitted on train + val, stored like a model's) and the stacking
    classifier (fitted on train)."""
    from lib.stacking import evaluate_stacking, stack_embeddings

    log(f"stacking {', '.join(names)}: {cfg.stack_projection} projection on train+val, stacking classifier on train")
    split_blocks = {split: {n: embeddings[n].of(split).vectors for n in names} for split in SPLITS}
    fit = {n: np.concatenate([split_blocks["train"][n], split_blocks["val"][n]]) for n in names}
    first = embeddings[names[0]]  # every model's rows are the same images in the same order (check_aligned)
    fit_labels = np.concatenate([first.train.labels, first.val.labels])
    stacked = stack_embeddings(fit, fit_labels, split_blocks, method=cfg.stack_projection)
    result = evaluate_stacking(split_blocks["train"], first.train.labels, split_blocks["test"], first.test.labels)
    splits = Splits(**{split: SplitEmbeddings(first.of(split).ids, first.of(split).labels, stacked[split])
                       for split in SPLITS})
    folder = RunPaths.of(cfg.run_dir).embeddings(STACKED)
    for split in SPLITS:
        part = splits.of(split)
        write_split(folder / f"{split}.parquet", part.ids, part.labels, part.vectors)
    write_json(folder / "source.json", {"name": STACKED, "from": names, "method": cfg.stack_projection,
                                        "fit": "train+val"})
    return splits, {"stacking_classifier": {"train_acc": result.train_acc, "test_acc": result.test_acc},
                    "stacked_from": names}


def score_model(name: str, splits: Splits, use_gpu: str, extra: dict,
                leaked_ids: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Retrieval under protocols L and G, and the linear probe, as a ``metrics.json`` model entry; with
    ``leaked_ids`` (test ids with a near-duplicate in train) protocol G again without those queries (``G_CLEAN``)."""
    from lib.retrieval.protocols import evaluate_protocol, evaluate_protocols, linear_probe

    train, test = splits.train, splits.test
    detail(f"{name}: retrieval (protocols L and G) and linear probe on {len(test.ids)} test / {len(train.ids)} train")
    protocols = evaluate_protocols(train.vectors, train.labels, test.vectors, test.labels, use_gpu=use_gpu)
    train_acc, test_acc = linear_probe(train.vectors, train.labels, test.vectors, test.labels)
    clean = ~np.isin(np.asarray(test.ids).astype(str), np.asarray(sorted(leaked_ids), dtype=str))
    if leaked_ids and clean.any():
        extra = {**extra, G_CLEAN: evaluate_protocol(test.vectors[clean], test.labels[clean], train.vectors,
                                                     train.labels, leave_one_out=False, use_gpu=use_gpu)}
    entry = model_entry(protocols, train_acc, test_acc, **extra)
    log(f"{name}: mAP@5 L {entry['L']['map@5']:.3f} G {entry['G']['map@5']:.3f}, kNN acc {entry['knn_acc']:.3f}, "
        f"probe test acc {test_acc:.3f}")
    return entry


def find_near_duplicates(cfg: EvaluateConfig, data: PreparedData, out: Path) -> frozenset[str]:
    """Test images whose nearest train image is a near-duplicate in pixel space (:mod:`lib.duplicates`): written to
    ``near_duplicates.parquet`` (one row per such test image, most similar first) and drawn in
    ``near_duplicates.png``; returns their ids. Holds both splits' pixels in memory while it runs."""
    import pyarrow as pa

    from lib.duplicates import nearest_train
    from lib.plots import near_duplicates_figure, save_figure

    test, train = data.read_split("test"), data.read_split("train")
    found = nearest_train(test.images, train.images, threshold=cfg.near_duplicate_threshold)
    rows = np.flatnonzero(found.duplicate)
    rows = rows[np.argsort(-found.similarity[rows], kind="stable")]
    pairs = found.train_rows[rows]
    table = pa.table({"test_id": pa.array(test.ids[rows].astype(str), pa.string()),
                      "train_id": pa.array(train.ids[pairs].astype(str), pa.string()),
                      "similarity": pa.array(found.similarity[rows], pa.float32()),
                      "test_label": pa.array(test.labels[rows], pa.int64()),
                      "train_label": pa.array(train.labels[pairs], pa.int64())})
    with atomic_path(out / "near_duplicates.parquet") as tmp:
        write_parquet(table, tmp)
    shown = rows[:24]
    save_figure(near_duplicates_figure(test.images[shown], train.images[found.train_rows[shown]],
                                       found.similarity[shown], found.count, len(test), cfg.near_duplicate_threshold),
                out / "near_duplicates.png")
    log(f"near-duplicates: {found.count} of {len(test)} test images ({100 * found.share:.2f} %) have a train image "
        f"at pixel-signature similarity >= {cfg.near_duplicate_threshold} -> {out / 'near_duplicates.parquet'}")
    return frozenset(test.ids[rows].astype(str))


def cluster_model(name: str, test: SplitEmbeddings, seed: int) -> tuple[dict[str, float], np.ndarray]:
    from lib.clustering import cluster_embeddings

    clusters, scores = cluster_embeddings(test.vectors, test.labels, seed=seed)
    log(f"{name}: K-Means NMI {scores['nmi']:.3f}, ARI {scores['ari']:.3f}, purity {scores['purity']:.3f}")
    return scores, clusters


def write_figures(cfg: EvaluateConfig, data: PreparedData, out: Path, splits: Splits, name: str,
                  clusters: np.ndarray, scores: dict[str, float]) -> None:
    """``tsne.png``, ``clusters.png``, ``map.json`` and ``retrieval_grid.png`` of model ``name``."""
    from lib.clustering import tsne_2d
    from lib.plots import clusters_figure, retrieval_grid_figure, save_figure, tsne_figure
    from lib.retrieval.index import knn

    classes = data.classes
    ids, labels, test = splits.test.ids, splits.test.labels, splits.test.vectors
    rows = seeded_subset(len(test), cfg.tsne_points, cfg.seed)
    log(f"{name}: t-SNE of {len(rows)} test embeddings")
    # threads only pay off on large maps: measured on 2 busy cores, 24 points took 22 s with all
    # cores and 2 s with one (thread start-up and contention dominate)
    points = tsne_2d(test[rows], seed=cfg.seed, n_jobs=1 if len(rows) < TSNE_THREADED_FROM else -1)
    save_figure(tsne_figure(points, labels[rows], classes, title=f"t-SNE of {name} test embeddings, by true class"),
                out / "tsne.png")
    save_figure(clusters_figure(points, labels[rows], clusters[rows], classes, scores), out / "clusters.png")
    write_tsne_map(out / "map.json", tsne_map_document(name, classes, ids[rows], labels[rows], clusters[rows], points))
    train_ids, train_labels, train = splits.train.ids, splits.train.labels, splits.train.vectors
    queries = grid_query_rows(labels, cfg.grid_queries, cfg.seed)
    detail(f"{name}: retrieval grid of {len(queries)} test queries from {len(np.unique(labels[queries]))} of "
           f"{len(np.unique(labels))} classes")
    similarities, neighbours = knn(test[queries], train, min(cfg.grid_k, len(train)), use_gpu=cfg.faiss_use_gpu)
    gallery_rows = np.unique(neighbours)  # only the neighbours' pixels are read
    figure = retrieval_grid_figure(
        data.images_by_id("test", [str(ids[q]) for q in queries]), labels[queries],
        data.images_by_id("train", [str(i) for i in train_ids[gallery_rows]]),
        train_labels[gallery_rows], np.searchsorted(gallery_rows, neighbours), classes, similarities)
    save_figure(figure, out / "retrieval_grid.png")


def save_index(cfg: EvaluateConfig, data: PreparedData, out: Path, splits: Splits, name: str) -> None:
    """``index.faiss``: an index of kind ``cfg.index`` over ``name``'s train embeddings (rows in
    ``index_rows.parquet``), and ``index.json``: what it is, its parameters, its recall@5 against exact search on
    the test queries (an approximate index's search parameter tuned on the val queries), build time and size."""
    import pyarrow as pa

    from lib.retrieval.approximate import build_tuned_index, resolve_index_kind
    from lib.retrieval.index import faiss, l2_normalize

    ids, labels, vectors = splits.train.ids, splits.train.labels, l2_normalize(splits.train.vectors)
    kind = resolve_index_kind(cfg.index, len(ids))
    test = l2_normalize(splits.test.vectors)
    tune = l2_normalize(splits.val.vectors) if len(splits.val.ids) else test
    if kind != "exact":
        log(f"{name}: building a {kind} index of {len(ids)} train rows, tuned to recall@5 >= {cfg.index_recall} "
            f"on {len(tune)} {'val' if len(splits.val.ids) else 'test'} queries")
    built = build_tuned_index(vectors, kind, tune, test, cfg.index_recall, seed=cfg.seed)
    with atomic_path(out / "index.faiss") as tmp:
        faiss.write_index(built.index, str(tmp))
        size = tmp.stat().st_size
    rows = pa.table({"id": pa.array([str(i) for i in ids], pa.string()), "label": pa.array(labels, pa.int64())})
    with atomic_path(out / "index_rows.parquet") as tmp:
        write_parquet(rows, tmp)  # row i of the table = row i of the index
    recall_queries = ("exact search" if kind == "exact" else
                      f"{len(test)} test queries; parameter tuned on {len(tune)} "
                      f"{'val' if len(splits.val.ids) else 'test'} queries to {cfg.index_recall}")
    write_json(out / "index.json", {"model": name, "rows": len(ids), "dim": int(vectors.shape[1]),
                                    "similarity": "inner product of L2-normalised embeddings (cosine)",
                                    "split": "train", "data_dir": str(data.root), "classes": data.classes,
                                    "image_shape": list(data.image_shape),
                                    "source": read_json(RunPaths.of(cfg.run_dir).embeddings(name) / "source.json"),
                                    "type": kind, "chosen_by": cfg.index, "parameters": built.parameters,
                                    "recall@5": round(built.recall, 4), "recall_queries": recall_queries,
                                    "tuning": built.tried, "build_s": round(built.build_s, 3), "bytes": size})
    log(f"saved the {name} train-gallery {kind} index ({len(ids)} rows, recall@5 {built.recall:.3f}) -> "
        f"{out / 'index.faiss'}")


def export_blocks(embeddings: dict[str, Splits], limit: int, seed: int) -> Iterator[tuple]:
    """(name, ids, labels, embeddings) of a seeded subset of each model's test rows, for ``embeddings.csv``."""
    for name, splits in embeddings.items():
        test = splits.test
        rows = seeded_subset(len(test.ids), limit, seed)
        yield name, test.ids[rows], test.labels[rows], test.vectors[rows]
