"""The embedding actor pool on Ray Data: every prepared split through every model in one pass.

:func:`ensure_embeddings` embeds the models whose stored embeddings (:mod:`lib.embedding`) are missing or
stale: the prepared files stream (one block each) through an actor pool that loads each model once per
actor, and the rows come back to the driver, which writes ``RUN/embeddings/<name>/``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import ray
import torch

from lib.console import Progress, log
from lib.data.reader import SPLITS, PreparedData
from lib.devices import available_cpus, cuda_unusable_reason
from lib.embedding import (
    SOURCE_FILE,
    ModelSource,
    embed_with_models,
    load_embedding_model,
    up_to_date,
    write_split,
)
from lib.io import write_json
from lib.paths import RunPaths
from lib.planning import ActorPlan
from lib.precision import uses_bf16
from onray.data import read_prepared
from onray.plan import actor_plan


class EmbedBatches:
    """Ray Data actor: loads each model once, then embeds every batch's ``image`` column with each of them.

    Output columns: every input column but ``image``, plus ``embedding_<i>`` (N, D_i) for ``sources[i]``.
    One pass over the images serves all models, and an actor's start-up (a process importing torch)
    is paid once, not once per model. CPU actors split the node's cores between the actors that
    share it (Ray pins an actor to one thread otherwise).
    """

    def __init__(self, sources: list[dict[str, Any]], actors_per_node: int = 1):
        self.sources = [ModelSource(**source) for source in sources]
        if ray.get_gpu_ids() and not torch.cuda.is_available():
            raise RuntimeError(cuda_unusable_reason())  # never a silent CPU fallback on a GPU actor
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, available_cpus() // actors_per_node))
        self.models = [load_embedding_model(source, self.device) for source in self.sources]
        self.bf16 = [uses_bf16(source.precision, self.device) for source in self.sources]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {key: value for key, value in batch.items() if key != "image"}
        vectors = embed_with_models(self.models, self.sources, batch["image"], self.device, self.bf16)
        out.update({f"embedding_{i}": v for i, v in enumerate(vectors)})
        return out


def embedding_dataset(images: ray.data.Dataset, sources: list[ModelSource], plan: ActorPlan,
                      batch_size: int) -> ray.data.Dataset:
    """``images`` (an ``image`` column, any others) -> the same rows with ``embedding_<i>`` instead of ``image``."""
    return images.map_batches(EmbedBatches, batch_size=batch_size, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=plan.actors), num_gpus=plan.gpus_per_actor,
                              num_cpus=plan.cpus_per_actor,
                              fn_constructor_kwargs={"sources": [dataclasses.asdict(s) for s in sources],
                                                     "actors_per_node": plan.actors_per_node})


def stream_embeddings(data: PreparedData, sources: list[ModelSource], plan: ActorPlan,
                      batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Embed every split of ``data`` with every source in one streaming pass (Ray Data actor pool).

    Returns ``{split: {"id", "label", "embedding_<i>"}}`` (rows in arrival order); shows a progress bar.
    """
    columns = ["id", "label", *(f"embedding_{i}" for i in range(len(sources)))]
    parts: dict[str, list[dict[str, np.ndarray]]] = {split: [] for split in SPLITS}
    total = sum(data.rows(split) for split in SPLITS)
    progress = Progress(total, f"embed with {len(sources)} model(s)")
    done = 0
    images = read_prepared(data, readers=plan.actors)
    for batch in embedding_dataset(images, sources, plan, batch_size).iter_batches(batch_size=None,
                                                                                   batch_format="numpy"):
        splits = np.asarray(batch["split"])
        for split in np.unique(splits):
            keep = splits == split
            parts[str(split)].append({k: np.asarray(batch[k])[keep] for k in columns})
        done += len(splits)
        progress.update(done)
    progress.close()
    merged = {}
    for split, chunks in parts.items():
        if not chunks:
            raise RuntimeError(f"no rows came back for split {split}")
        merged[split] = {k: np.concatenate([c[k] for c in chunks]) for k in columns}
    return merged


def ensure_embeddings(data: PreparedData, run_dir: str, sources: list[ModelSource], batch_size: int,
                      use_gpu: str = "auto", num_actors: int = 0) -> list[str]:
    """Embed every split with every source whose embeddings are missing or stale; returns the names embedded."""
    run = RunPaths.of(run_dir)
    fingerprint = data.fingerprint()
    todo = [s for s in sources if not up_to_date(run_dir, s.name, s.identity(fingerprint))]
    for source in sources:
        if source not in todo:
            log(f"{source.name}: embeddings up to date ({run.embeddings(source.name)}); skipping")
    if not todo:
        return []
    plan = actor_plan(use_gpu, num_actors)
    for source in todo:
        run.embeddings(source.name).mkdir(parents=True, exist_ok=True)
        (run.embeddings(source.name) / SOURCE_FILE).unlink(missing_ok=True)  # stale until rewritten
    started = time.perf_counter()
    log(f"embedding every split with {', '.join(s.name for s in todo)} on {plan.actors} "
        f"{'GPU' if plan.on_gpu else 'CPU'} actor(s)")
    merged = stream_embeddings(data, todo, plan, batch_size)
    for i, source in enumerate(todo):
        folder = run.embeddings(source.name)
        for split, table in merged.items():
            write_split(folder / f"{split}.parquet", table["id"], table["label"], table[f"embedding_{i}"])
        write_json(folder / SOURCE_FILE, source.identity(fingerprint))  # last: marks the folder complete
    rows, seconds = sum(len(t["id"]) for t in merged.values()), time.perf_counter() - started
    log(f"embedded {rows} images with {len(todo)} model(s) in {seconds:.1f} s "
        f"({rows * len(todo) / seconds:.0f} embeddings/s) -> {run.embeddings('*')}")
    return [s.name for s in todo]
