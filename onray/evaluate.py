"""``jobs.evaluate`` on Ray: embed with every model on the actor pool, then score, stack, cluster and report.

Rerunning with the same models, data and flags does nothing (``metrics.json`` records them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lib.config import to_dict
from lib.console import log
from lib.data.reader import SPLITS, PreparedData
from lib.embedding import check_loadable, model_sources, read_embeddings, up_to_date
from lib.evaluation import (
    EvaluateConfig,
    Splits,
    check_aligned,
    cluster_model,
    describe_weights,
    export_blocks,
    find_near_duplicates,
    finished,
    save_index,
    score_model,
    stacked_model,
    write_figures,
)
from lib.io import atomic_copy, ensure_writable_dir, write_json, write_text
from lib.paths import RunPaths
from lib.planning import JobPlan, actors_job_plan
from lib.report import (
    STACKED,
    best_model,
    metrics_document,
    near_duplicates_note,
    results_markdown,
    write_embeddings_csv,
)
from lib.tracking import Tracker
from onray.embed import ensure_embeddings
from onray.plan import plan_actor_pool
from onray.runtime import check_cluster_paths, check_shared_storage, init_ray


def model_names(run: RunPaths, backbones: tuple[str, ...], include_untrained: bool) -> list[str]:
    """The names an evaluation of ``run`` embeds with (as :func:`lib.embedding.model_sources` names them), read
    from RUN/models alone: nothing loaded or fetched."""
    trained = set(run.trained_backbones())
    names = []
    for backbone in backbones or tuple(sorted(trained)):
        names.append(backbone if backbone in trained else f"{backbone}-untrained")
        if backbone in trained and include_untrained:
            names.append(f"{backbone}-untrained")
    return names


def dry_run(cfg: EvaluateConfig) -> JobPlan:
    """``jobs.evaluate --dry-run``: the embedding actors' plan (how many, on GPUs or CPUs, on which nodes, what the
    autoscaler would be asked for) for every model the evaluation embeds; nothing embedded, written or asked for."""
    check_cluster_paths(data_dir=cfg.data_dir, run_dir=cfg.run_dir)
    run = RunPaths.of(cfg.run_dir)
    data = PreparedData.open(Path(cfg.data_dir).expanduser().absolute())
    names = model_names(run, cfg.backbones, cfg.include_untrained)
    init_ray()
    plan, shape = plan_actor_pool(cfg.use_gpu, cfg.num_actors)
    rows = sum(data.rows(split) for split in SPLITS)
    notes = (f"every model embeds the {rows:,} images of {', '.join(SPLITS)} in one pass of the pool, "
             f"{cfg.batch_size} per batch",) if names else (f"no trained models in {run.models} yet",)
    return actors_job_plan("jobs.evaluate", names, plan, shape, shape.gpus, notes)


def evaluate_run(cfg: EvaluateConfig) -> tuple[Path, str]:
    """Evaluate ``cfg.run_dir``'s models; returns ``RUN/eval`` and the results table (markdown)."""
    check_cluster_paths(data_dir=cfg.data_dir, run_dir=cfg.run_dir)
    run = RunPaths.of(cfg.run_dir)
    cfg = dataclasses.replace(cfg, run_dir=str(run.root), data_dir=str(Path(cfg.data_dir).expanduser().absolute()))
    data = PreparedData.open(cfg.data_dir)
    sources = model_sources(cfg.run_dir, cfg.backbones, cfg.include_untrained, cfg.weights, cfg.embedding_dim,
                            cfg.image_size, cfg.seed, cfg.precision)
    fingerprint = data.fingerprint()
    # where it is tracked is not part of what an evaluation computes: a rerun with or without --mlflow is the same one
    config = {**{k: v for k, v in to_dict(cfg).items() if k != "mlflow"},
              "sources": {s.name: s.identity(fingerprint) for s in sources}}
    tracker = Tracker.connect(cfg.mlflow, cfg.run_dir)  # None without --mlflow; a dead server is one line here
    if finished(run.eval, config):
        log(f"nothing to do: {run.eval} already holds this evaluation")
        if tracker:
            tracker.log_evaluation()  # one missed while the server was down is logged now
        return run.eval, (run.eval / "results.md").read_text()
    check_loadable([s for s in sources if not up_to_date(cfg.run_dir, s.name, s.identity(fingerprint))])
    out = ensure_writable_dir(run.eval)
    # the outputs below are about to change: a reader must not take the old report for this evaluation's
    (out / "metrics.json").unlink(missing_ok=True)
    (out / "results.md").unlink(missing_ok=True)
    init_ray()
    check_shared_storage(out, data.root)
    log(f"embedding train/val/test with {', '.join(s.name for s in sources)}")
    ensure_embeddings(data, cfg.run_dir, sources, cfg.batch_size, cfg.use_gpu, cfg.num_actors)
    embeddings = {s.name: Splits(**{split: read_embeddings(cfg.run_dir, s.name, split) for split in SPLITS})
                  for s in sources}
    check_aligned(embeddings, run)
    stack = [s.name for s in sources if not s.baseline]
    models: dict = {}
    if len(stack) >= 2:
        embeddings[STACKED], models[STACKED] = stacked_model(cfg, embeddings, stack)
    leaked = find_near_duplicates(cfg, data, out)
    clusters, cluster_ids = {}, {}
    for name, splits in embeddings.items():
        models[name] = score_model(name, splits, cfg.faiss_use_gpu, models.get(name, {}), leaked)
        clusters[name], cluster_ids[name] = cluster_model(name, splits.test, cfg.seed)
    models = {name: models[name] for name in embeddings}  # report in evaluation order
    best = best_model(models)
    best_single = best_model(models, [name for name in models if name != STACKED])
    write_figures(cfg, data, out, embeddings[best], best, cluster_ids[best], clusters[best])
    save_index(cfg, data, out, embeddings[best_single], best_single)
    write_embeddings_csv(out / "embeddings.csv", export_blocks(embeddings, cfg.csv_rows, cfg.seed))
    for source in sources:
        curve = run.model(source.backbone) / "loss_curve.png"
        if source.trained and curve.is_file():
            atomic_copy(curve, out / f"loss_curve_{source.backbone}.png")
    metrics = metrics_document(models, clusters, config)
    notes = [f"Models: {', '.join(f'{s.name} ({describe_weights(run, s)})' for s in sources)}. "
             f"Best by mAP@5 G: {best}; t-SNE, clusters and retrieval grid show {best}; "
             f"the saved index (jobs.search) is {best_single}'s train gallery.",
             near_duplicates_note(metrics, len(leaked), data.rows("test"), cfg.near_duplicate_threshold)]
    table = results_markdown(metrics, notes)
    write_text(out / "results.md", table)
    write_json(out / "metrics.json", metrics)  # last: marks the evaluation complete
    if tracker:
        tracker.log_evaluation()
    return out, table
