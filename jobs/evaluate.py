"""Evaluate embeddings: retrieval (protocols L and G), linear probe, kNN, clusters, stacking, report files.

    python -m jobs.evaluate --data-dir DATA --run-dir RUN [--backbones resnet50,vgg16] [--include-untrained]

Every model (trained backbones in RUN/models, their untrained networks, untrained ``--backbones``)
embeds all splits on Ray Data (jobs.embed); with two or more it adds ``stacked``. Output in RUN/eval/:
``results.md``, ``tsne.png``, ``clusters.png``, ``retrieval_grid.png``, ``loss_curve_<backbone>.png``,
``embeddings.csv`` (test rows), ``index.faiss`` + ``index_rows.parquet`` + ``index.json`` (the best
single network's train gallery, for jobs.search) and, last, ``metrics.json`` (lib.report layout).
Rerunning with the same models, data and flags does nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from jobs.embed import (
    data_fingerprint,
    embeddings_dir,
    ensure_embeddings,
    model_sources,
    read_embeddings,
    read_images_by_id,
    write_split,
)
from jobs.runtime import init_ray, log, run_job
from lib.config import option, to_dict
from lib.dataset import read_manifest
from lib.errors import UserError
from lib.io import ensure_writable_dir, write_json
from lib.precision import PRECISION_HELP, Precision
from lib.report import (
    STACKED,
    best_model,
    grid_query_rows,
    metrics_document,
    model_entry,
    results_markdown,
    seeded_subset,
    write_embeddings_csv,
)

OUTPUTS = ("results.md", "tsne.png", "clusters.png", "retrieval_grid.png", "embeddings.csv", "index.faiss",
           "index_rows.parquet", "index.json")

TSNE_THREADED_FROM = 5000  # points


@dataclass(frozen=True)
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
    use_gpu: Literal["auto", "true", "false"] = option("auto", help="GPUs for embedding and faiss when present")
    precision: Precision = option("auto", help=PRECISION_HELP)
    tsne_points: int = option(10000, help="test points in the t-SNE and cluster maps (a seeded subset)")
    grid_queries: int = option(8, help="test queries in retrieval_grid.png")
    grid_k: int = option(8, help="train neighbours per query in retrieval_grid.png")
    csv_rows: int = option(2000, help="test rows per model in embeddings.csv (a seeded subset; 0 = all)")
    stack_projection: Literal["lda", "pca"] = option("lda", help="stacked embedding's projection (fit on train+val)")
    seed: int = option(0, help="seed of untrained networks, subsets, K-Means and t-SNE")

    def __post_init__(self) -> None:
        from lib.backbones import check_backbones

        if self.backbones:
            check_backbones(self.backbones)
        for name in ("embedding_dim", "image_size", "batch_size", "grid_queries", "grid_k", "tsne_points"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


def finished(out: Path, config: dict) -> bool:
    try:
        recorded = json.loads((out / "metrics.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == config and all((out / name).is_file() for name in OUTPUTS)


def main(cfg: EvaluateConfig) -> Path:
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).expanduser().absolute()),
                              data_dir=str(Path(cfg.data_dir).expanduser().absolute()))
    manifest = read_manifest(cfg.data_dir)
    out = ensure_writable_dir(Path(cfg.run_dir) / "eval")
    sources = model_sources(cfg.run_dir, cfg.backbones, cfg.include_untrained, cfg.weights, cfg.embedding_dim,
                            cfg.image_size, cfg.seed, cfg.precision)
    fingerprint = data_fingerprint(cfg.data_dir)
    config = {**to_dict(cfg), "sources": {s.name: s.identity(fingerprint) for s in sources}}
    if finished(out, config):
        log(f"nothing to do: {out} already holds this evaluation")
        print((out / "results.md").read_text(), end="")
        return out
    (out / "metrics.json").unlink(missing_ok=True)  # the outputs below are about to change
    init_ray()
    log(f"embedding train/val/test with {', '.join(s.name for s in sources)}")
    ensure_embeddings(cfg.data_dir, cfg.run_dir, sources, cfg.batch_size, cfg.use_gpu, cfg.num_actors)
    embeddings = {s.name: {split: read_embeddings(cfg.run_dir, s.name, split) for split in ("train", "val", "test")}
                  for s in sources}
    check_aligned(embeddings, cfg.run_dir)
    stack = [s.name for s in sources if not s.baseline]
    models: dict = {}
    if len(stack) >= 2:
        embeddings[STACKED], models[STACKED] = stacked_model(cfg, embeddings, stack)
    # --use-gpu true insists on GPUs for the embedding actors; faiss takes a GPU only when its build has one
    use_gpu = "false" if cfg.use_gpu == "false" else "auto"
    clusters, cluster_ids = {}, {}
    for name, splits in embeddings.items():
        models[name] = score_model(name, splits, use_gpu, models.get(name, {}))
        clusters[name], cluster_ids[name] = cluster_model(name, splits["test"], cfg.seed)
    models = {name: models[name] for name in embeddings}  # report in evaluation order
    best = best_model(models)
    best_single = best_model(models, [name for name in models if name != STACKED])
    write_figures(cfg, out, manifest["classes"], embeddings[best], best, cluster_ids[best], clusters[best])
    save_index(cfg, out, embeddings[best_single]["train"], best_single, manifest)
    write_embeddings_csv(out / "embeddings.csv", export_blocks(embeddings, cfg.csv_rows, cfg.seed))
    for source in sources:
        curve = Path(cfg.run_dir) / "models" / source.backbone / "loss_curve.png"
        if source.trained and curve.is_file():
            shutil.copyfile(curve, out / f".loss_curve_{source.backbone}.png.tmp")
            os.replace(out / f".loss_curve_{source.backbone}.png.tmp", out / f"loss_curve_{source.backbone}.png")
    metrics = metrics_document(models, clusters, config)
    notes = [f"Models: {', '.join(f'{s.name} ({describe_weights(s)})' for s in sources)}. "
             f"Best by mAP@5 G: {best}; t-SNE, clusters and retrieval grid show {best}; "
             f"the saved index (jobs.search) is {best_single}'s train gallery."]
    write_text(out / "results.md", results_markdown(metrics, notes))
    write_json(out / "metrics.json", metrics)  # last: marks the evaluation complete
    print(results_markdown(metrics, notes), end="")
    return out


def write_text(path: Path, text: str) -> None:
    from lib.io import atomic_open

    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def describe_weights(source) -> str:
    if source.trained:
        config = json.loads((Path(source.weights).parent / "config.json").read_text())
        return (f"trained, preset {config.get('preset', '?')}, initial weights {config.get('weights', '?')}, "
                f"{config['image_size']} px, D={config['embedding_dim']}")
    weights = source.weights if source.weights in ("none", "imagenet") else Path(source.weights).name
    return f"untrained, weights {weights}, {source.image_size} px, D={source.embedding_dim}"


def check_aligned(embeddings: dict, run_dir: str) -> None:
    """Every model's split must hold the same ids in the same order (stacking compares rows)."""
    first = next(iter(embeddings))
    for name, splits in embeddings.items():
        for split, (ids, _, _) in splits.items():
            if not np.array_equal(ids, embeddings[first][split][0]):
                raise UserError(f"embeddings of {name} and {first} cover different {split} images; "
                                f"delete {embeddings_dir(run_dir, name)} and rerun")


def stacked_model(cfg: EvaluateConfig, embeddings: dict, names: list[str]) -> tuple[dict, dict]:
    """The stacked embedding (projection fitted on train + val) and the stacking classifier (fitted on train)."""
    from lib.stacking import evaluate_stacking, stack_embeddings

    log(f"stacking {', '.join(names)}: {cfg.stack_projection} projection on train+val, stacking classifier on train")
    split_blocks = {split: {n: embeddings[n][split][2] for n in names} for split in ("train", "val", "test")}
    fit = {n: np.concatenate([split_blocks["train"][n], split_blocks["val"][n]]) for n in names}
    first = embeddings[names[0]]
    fit_labels = np.concatenate([first["train"][1], first["val"][1]])
    stacked = stack_embeddings(fit, fit_labels, split_blocks, method=cfg.stack_projection)
    result = evaluate_stacking(split_blocks["train"], first["train"][1], split_blocks["test"], first["test"][1])
    splits = {split: (first[split][0], first[split][1], vectors) for split, vectors in stacked.items()}
    for split, (ids, labels, vectors) in splits.items():
        write_split(embeddings_dir(cfg.run_dir, STACKED) / f"{split}.parquet", ids, labels, vectors)
    write_json(embeddings_dir(cfg.run_dir, STACKED) / "source.json",
               {"name": STACKED, "from": names, "method": cfg.stack_projection, "fit": "train+val"})
    return splits, {"stacking_classifier": {"train_acc": result.train_acc, "test_acc": result.test_acc},
                    "stacked_from": names}


def score_model(name: str, splits: dict, use_gpu: str, extra: dict) -> dict:
    from lib.retrieval import evaluate_protocols, linear_probe

    (_, train_labels, train), (_, test_labels, test) = splits["train"], splits["test"]
    log(f"{name}: retrieval (protocols L and G) and linear probe on {len(test)} test / {len(train)} train")
    protocols = evaluate_protocols(train, train_labels, test, test_labels, use_gpu=use_gpu)
    train_acc, test_acc = linear_probe(train, train_labels, test, test_labels)
    entry = model_entry(protocols, train_acc, test_acc, **extra)
    log(f"{name}: mAP@5 L {entry['L']['map@5']:.3f} G {entry['G']['map@5']:.3f}, kNN acc {entry['knn_acc']:.3f}, "
        f"probe test acc {test_acc:.3f}")
    return entry


def cluster_model(name: str, test: tuple, seed: int) -> tuple[dict, np.ndarray]:
    from lib.clustering import cluster_embeddings

    ids, labels, vectors = test
    clusters, scores = cluster_embeddings(vectors, labels, seed=seed)
    log(f"{name}: K-Means NMI {scores['nmi']:.3f}, ARI {scores['ari']:.3f}, purity {scores['purity']:.3f}")
    return scores, clusters


def write_figures(cfg: EvaluateConfig, out: Path, classes: list[str], splits: dict, name: str,
                  clusters: np.ndarray, scores: dict) -> None:
    from lib.clustering import tsne_2d
    from lib.plots import clusters_figure, retrieval_grid_figure, save_figure, tsne_figure
    from lib.retrieval import knn

    ids, labels, test = splits["test"]
    rows = seeded_subset(len(test), cfg.tsne_points, cfg.seed)
    log(f"{name}: t-SNE of {len(rows)} test embeddings")
    # threads only pay off on large maps: measured on 2 busy cores, 24 points took 22 s with all
    # cores and 2 s with one (thread start-up and contention dominate)
    points = tsne_2d(test[rows], seed=cfg.seed, n_jobs=1 if len(rows) < TSNE_THREADED_FROM else -1)
    save_figure(tsne_figure(points, labels[rows], classes, title=f"t-SNE of {name} test embeddings, by true class"),
                out / "tsne.png")
    save_figure(clusters_figure(points, labels[rows], clusters[rows], classes, scores), out / "clusters.png")
    train_ids, train_labels, train = splits["train"]
    queries = grid_query_rows(labels, cfg.grid_queries, cfg.seed)
    similarities, neighbours = knn(test[queries], train, min(cfg.grid_k, len(train)),
                                   use_gpu="false" if cfg.use_gpu == "false" else "auto")
    gallery_rows = np.unique(neighbours)  # only the neighbours' pixels are read
    figure = retrieval_grid_figure(
        read_images_by_id(cfg.data_dir, "test", [str(ids[q]) for q in queries]), labels[queries],
        read_images_by_id(cfg.data_dir, "train", [str(i) for i in train_ids[gallery_rows]]),
        train_labels[gallery_rows], np.searchsorted(gallery_rows, neighbours), classes, similarities)
    save_figure(figure, out / "retrieval_grid.png")


def save_index(cfg: EvaluateConfig, out: Path, train: tuple, name: str, manifest: dict) -> None:
    """``index.faiss``: an exact inner-product index of ``name``'s train embeddings; rows in ``index_rows.parquet``."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lib.retrieval import l2_normalize

    ids, labels, vectors = train
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(l2_normalize(vectors))
    faiss.write_index(index, str(out / ".index.faiss.tmp"))
    os.replace(out / ".index.faiss.tmp", out / "index.faiss")
    rows = pa.table({"id": pa.array([str(i) for i in ids], pa.string()), "label": pa.array(labels, pa.int64())})
    pq.write_table(rows, out / ".index_rows.parquet.tmp")  # row i of the table = row i of the index
    os.replace(out / ".index_rows.parquet.tmp", out / "index_rows.parquet")
    write_json(out / "index.json", {"model": name, "rows": len(ids), "dim": int(vectors.shape[1]),
                                    "similarity": "inner product of L2-normalised embeddings (cosine)",
                                    "split": "train", "data_dir": cfg.data_dir, "classes": manifest["classes"],
                                    "image_shape": manifest["image_shape"],
                                    "source": json.loads((embeddings_dir(cfg.run_dir, name) / "source.json")
                                                         .read_text())})
    log(f"saved the {name} train-gallery index ({len(ids)} rows) -> {out / 'index.faiss'}")


def export_blocks(embeddings: dict, limit: int, seed: int):
    for name, splits in embeddings.items():
        ids, labels, vectors = splits["test"]
        rows = seeded_subset(len(ids), limit, seed)
        yield name, ids[rows], labels[rows], vectors[rows]


def cli(argv: list[str] | None = None) -> int:
    return run_job(main, EvaluateConfig, argv, prog="jobs.evaluate")


if __name__ == "__main__":
    sys.exit(cli())
