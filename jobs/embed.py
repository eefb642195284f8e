"""Embedding extraction on Ray Data: every prepared split through one model, one model load per actor.

Output per model ``NAME`` (a backbone, ``<backbone>-untrained`` or ``stacked``)::

    RUN/embeddings/NAME/{train,val,test}.parquet   id: string, label: int64, embedding: float32[D]
    RUN/embeddings/NAME/source.json                what produced them; written last (= complete)

Rows are sorted by id, so the same split of every model has the same rows in the same order
(stacking relies on it). Extraction is skipped when ``source.json`` matches the model's checkpoint
(its SHA-256), settings and the prepared data (its manifest's SHA-256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from jobs.runtime import log
from lib.augment import as_tensor, normalize, resize_batch
from lib.backbones import EmbeddingNet, build_model, check_backbones, fetch_imagenet_weights
from lib.dataset import MANIFEST, SPLITS, split_files, table_ids, table_images
from lib.errors import UserError
from lib.io import read_json, write_json
from lib.precision import forward, prepare_for_bf16, uses_bf16

SOURCE_FILE = "source.json"
FORMAT_VERSION = 1
PROGRESS_EVERY_S = 15


@dataclass(frozen=True)
class ModelSource:
    """One network to embed with. ``weights``: ``none`` (seeded random init), ``imagenet`` or a state-dict path.

    ``baseline``: an untrained companion of a trained backbone (``--include-untrained``), reported but
    never stacked.
    """

    name: str
    backbone: str
    weights: str
    embedding_dim: int
    image_size: int
    seed: int = 0
    precision: str = "auto"
    trained: bool = False
    baseline: bool = False
    checkpoint_sha256: str = ""

    def identity(self, data_fingerprint: str) -> dict[str, Any]:
        """The ``source.json`` these settings and this data produce."""
        return {"format": FORMAT_VERSION, **dataclasses.asdict(self), "data_manifest_sha256": data_fingerprint}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(weights: str) -> str:
    """SHA-256 of a weights file; empty for ``none`` and ``imagenet``."""
    return "" if weights in ("none", "imagenet") or not Path(weights).is_file() else file_sha256(weights)


def data_fingerprint(data_dir: str | os.PathLike) -> str:
    """SHA-256 of ``DATA/manifest.json``: it lists every file and count, so new data means a new value."""
    return file_sha256(Path(data_dir) / MANIFEST)


def model_sources(run_dir: str | os.PathLike, backbones: tuple[str, ...], include_untrained: bool,
                  weights: str, embedding_dim: int, image_size: int, seed: int,
                  precision: str = "auto") -> list[ModelSource]:
    """The networks to evaluate: trained models in ``RUN/models/<b>/`` (complete = ``summary.json``),
    restricted to ``backbones`` when given; a listed backbone without a trained model is evaluated
    untrained (``weights``, ``embedding_dim``, ``image_size``); ``include_untrained`` adds each trained
    backbone's untrained network (its config's initial weights and seed)."""
    models = Path(run_dir) / "models"
    trained = sorted(p.parent.name for p in models.glob("*/summary.json") if (p.parent / "model.pt").is_file())
    if backbones:
        check_backbones(backbones)
    elif not trained:
        raise UserError(f"no trained models in {models} (no <backbone>/summary.json): run jobs.train first, "
                        f"or pass --backbones NAME[,NAME] to evaluate untrained networks (--weights none|imagenet)")
    sources = []
    for backbone in backbones or tuple(trained):
        if backbone not in trained:
            sources.append(ModelSource(f"{backbone}-untrained", backbone, weights, embedding_dim, image_size, seed,
                                       precision, checkpoint_sha256=weights_sha256(weights)))
            continue
        folder = models / backbone
        config = read_json(folder / "config.json")
        sources.append(ModelSource(backbone, backbone, str(folder / "model.pt"), int(config["embedding_dim"]),
                                   int(config["image_size"]), int(config.get("seed", 0)), precision, trained=True,
                                   checkpoint_sha256=file_sha256(folder / "model.pt")))
        if include_untrained:
            initial = str(config.get("weights", "none"))
            sources.append(ModelSource(f"{backbone}-untrained", backbone, initial, int(config["embedding_dim"]),
                                       int(config["image_size"]), int(config.get("seed", 0)), precision,
                                       baseline=True,
                                       checkpoint_sha256=weights_sha256(initial)))
    for source in sources:
        if source.weights == "imagenet":
            fetch_imagenet_weights(source.backbone)  # offline: one clear line now, not inside every actor
        elif source.weights != "none" and not Path(source.weights).is_file():
            raise UserError(f"weights file not found: {source.weights} (for {source.name}; use --weights "
                            f"none, imagenet or a file path)")
    return sources


# --------------------------------------------------------------------------- the model, in any process


def load_embedding_model(source: ModelSource, device: str | torch.device = "cpu") -> EmbeddingNet:
    """``source``'s network in eval mode on ``device`` (channels-last when it runs in bf16, see
    :func:`lib.precision.uses_bf16`); ``weights="none"`` is the same network for the same seed."""
    torch.manual_seed(source.seed)
    model = build_model(source.backbone, source.weights, source.embedding_dim).eval().to(device)
    return prepare_for_bf16(model, uses_bf16(source.precision, device))


def embed_images(model: EmbeddingNet, images: np.ndarray, image_size: int, device: torch.device | None = None,
                 bf16: bool = False) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, D) float32 unit vectors: resized to ``image_size``, ImageNet-normalised
    as in training (lib.augment), one forward pass without gradients (under bf16 autocast when ``bf16``)."""
    device = device or torch.device("cpu")
    # uint8 crosses to the device (a quarter of float32's bytes), and the resize runs there
    batch = normalize(resize_batch(as_tensor(images).to(device, non_blocking=True), image_size))
    with torch.inference_mode():
        return forward(model, batch, bf16).cpu().numpy()


def embed_loop(source: ModelSource, model: EmbeddingNet, images: np.ndarray, batch_size: int,
               device: str | torch.device = "cpu") -> np.ndarray:
    """The plain-PyTorch path: :func:`embed_images` with ``source``'s model (on ``device``) over
    ``images`` in batches, in this process."""
    device = torch.device(device)
    bf16 = uses_bf16(source.precision, device)
    chunks = [embed_images(model, images[i:i + batch_size], source.image_size, device, bf16)
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.embedding_dim), np.float32)


class EmbedBatches:
    """Ray Data actor: loads each model once, then embeds every batch's ``image`` column with each of them.

    Output columns: every input column but ``image``, plus ``embedding_<i>`` (N, D_i) for ``sources[i]``.
    One pass over the images serves all models, and an actor's start-up (a process importing torch)
    is paid once, not once per model. CPU actors split the node's cores between the actors that
    share it (Ray pins an actor to one thread otherwise).
    """

    def __init__(self, sources: list[dict[str, Any]], actors_per_node: int = 1):
        self.sources = [ModelSource(**source) for source in sources]
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // actors_per_node))
        self.models = [load_embedding_model(source, self.device) for source in self.sources]
        self.bf16 = [uses_bf16(source.precision, self.device) for source in self.sources]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {key: value for key, value in batch.items() if key != "image"}
        for i, (source, model) in enumerate(zip(self.sources, self.models, strict=True)):
            out[f"embedding_{i}"] = embed_images(model, batch["image"], source.image_size, self.device, self.bf16[i])
        return out


# A CPU node gets one single-threaded actor per core up to this many; past it, actors share the node's cores
# as torch threads. A team of threads waits at every op for any member that one of Ray's own processes
# preempted; separate processes do not. On 2 cores, two 1-thread actors embedded 60k images faster than one
# 2-thread actor in 6 of 8 paired rounds (medians 53.2 vs 58.2 s in one run of 4; this machine drifts).
MAX_CPU_ACTORS_PER_NODE = 8


def cpu_actors_per_node(node_cpus: int, cores: int | None = None) -> int:
    """CPU embedding actors for a node with ``node_cpus`` Ray CPUs and ``cores`` cores (when known: a local Ray
    advertises more logical CPUs than the machine has, see ``jobs.runtime.local_num_cpus``)."""
    return max(1, min(MAX_CPU_ACTORS_PER_NODE, node_cpus, cores or node_cpus))


def actor_plan(use_gpu: str, num_actors: int = 0) -> dict[str, Any]:
    """``map_batches`` resources: one actor per GPU (``num_gpus=1``), else :func:`cpu_actors_per_node` per node."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if use_gpu == "true" and gpus == 0:
        raise UserError("--use-gpu true, but the Ray cluster has no GPUs (use auto or false)")
    on_gpu = gpus > 0 and use_gpu != "false"
    here = ray.util.get_node_ip_address()
    cpu_nodes = [(int(node["Resources"].get("CPU", 0)), node["NodeManagerAddress"] == here)
                 for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]
    if num_actors:
        actors = num_actors
    elif on_gpu:
        actors = gpus
    else:
        actors = sum(cpu_actors_per_node(cpus, os.cpu_count() if local else None) for cpus, local in cpu_nodes)
    actors = max(1, actors)
    return {"compute": ray.data.ActorPoolStrategy(size=actors), "num_gpus": 1 if on_gpu else 0, "num_cpus": 1,
            "actors": actors, "actors_per_node": math.ceil(actors / max(1, len(cpu_nodes))), "on_gpu": on_gpu}


def read_prepared(data_dir: str | os.PathLike, readers: int = 1) -> ray.data.Dataset:
    """Every split of a prepared DATA as a Ray dataset of ``id``, ``image``, ``label``, ``split``: one block
    per Parquet file, read by at most ``readers`` tasks at a time.

    The files are known from the manifest, so there is no listing or metadata pass, and the ``split``
    column comes with the rows. Reading takes a fraction of the embedding's CPU: ``num_cpus=0.5`` says so,
    and, differing from the actors' request, keeps Ray Data from fusing it into the actor stage (which would
    bundle the one-row file entries into one task and stream nothing).
    """
    files = [{"split": split, "file": f} for split in SPLITS for f in split_files(data_dir, split)]
    return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        _read_files, batch_size=1, batch_format="numpy", num_cpus=0.5,
        compute=ray.data.TaskPoolStrategy(size=max(1, readers)))


def _read_files(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    columns: dict[str, list[np.ndarray]] = {"id": [], "image": [], "label": [], "split": []}
    for split, path in zip(batch["split"], batch["file"], strict=True):
        table = pq.read_table(str(path), columns=["id", "image", "label"])
        columns["id"].append(table_ids(table))
        columns["image"].append(table_images(table))
        columns["label"].append(table.column("label").to_numpy())
        columns["split"].append(np.full(len(table), str(split), dtype=object))
    return {key: np.concatenate(parts) for key, parts in columns.items()}


def embedding_dataset(images: ray.data.Dataset, sources: list[ModelSource], plan: dict[str, Any],
                      batch_size: int) -> ray.data.Dataset:
    """``images`` (an ``image`` column, any others) -> the same rows with ``embedding_<i>`` instead of ``image``."""
    return images.map_batches(EmbedBatches, batch_size=batch_size, batch_format="numpy", compute=plan["compute"],
                              num_gpus=plan["num_gpus"], num_cpus=plan["num_cpus"],
                              fn_constructor_kwargs={"sources": [dataclasses.asdict(s) for s in sources],
                                                     "actors_per_node": plan["actors_per_node"]})


def stream_embeddings(data_dir: str | os.PathLike, sources: list[ModelSource], plan: dict[str, Any],
                      batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Embed every split of ``data_dir`` with every source in one streaming pass (Ray Data actor pool).

    Returns ``{split: {"id", "label", "embedding_<i>"}}`` (rows in arrival order) and logs progress every
    ``PROGRESS_EVERY_S`` seconds.
    """
    columns = ["id", "label", *(f"embedding_{i}" for i in range(len(sources)))]
    parts: dict[str, list[dict[str, np.ndarray]]] = {split: [] for split in SPLITS}
    total = int(sum(read_json(Path(data_dir) / MANIFEST)["totals"].values()))
    started = last_log = time.perf_counter()
    done = 0
    images = read_prepared(data_dir, readers=plan["actors"])
    for batch in embedding_dataset(images, sources, plan, batch_size).iter_batches(batch_size=None,
                                                                                   batch_format="numpy"):
        splits = np.asarray(batch["split"])
        for split in np.unique(splits):
            keep = splits == split
            parts[str(split)].append({k: np.asarray(batch[k])[keep] for k in columns})
        done += len(splits)
        if time.perf_counter() - last_log > PROGRESS_EVERY_S or done == total:
            last_log, rate = time.perf_counter(), done / (time.perf_counter() - started)
            log(f"embedded {done}/{total} images ({rate:.0f} images/s, about {(total - done) / rate:.0f} s left)")
    merged = {}
    for split, chunks in parts.items():
        if not chunks:
            raise RuntimeError(f"no rows came back for split {split}")
        merged[split] = {k: np.concatenate([c[k] for c in chunks]) for k in columns}
    return merged


# --------------------------------------------------------------------------- files


def embeddings_dir(run_dir: str | os.PathLike, name: str) -> Path:
    return Path(run_dir) / "embeddings" / name


def write_split(path: Path, ids: np.ndarray, labels: np.ndarray, embeddings: np.ndarray) -> None:
    """One split's embeddings as Parquet, rows sorted by id, written atomically (temp name + rename)."""
    order = np.argsort(np.asarray(ids).astype(str), kind="stable")
    embeddings = np.ascontiguousarray(embeddings[order], dtype=np.float32)
    table = pa.table({"id": pa.array(np.asarray(ids).astype(str)[order], pa.string()),
                      "label": pa.array(np.asarray(labels)[order], pa.int64()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel(), pa.float32()),
                                                                     embeddings.shape[1])})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_embeddings(run_dir: str | os.PathLike, name: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (N,) str, labels (N,) int64, embeddings (N, D) float32) of one model's split."""
    path = embeddings_dir(run_dir, name) / f"{split}.parquet"
    if not path.is_file():
        raise UserError(f"no embeddings for model {name!r}: {path} is missing (run jobs.evaluate)")
    table = pq.read_table(path)
    column = table.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    return table_ids(table), table.column("label").to_numpy(), vectors


def read_images_by_id(data_dir: str | os.PathLike, split: str, ids: list[str]) -> np.ndarray:
    """(len(ids), H, W, 3) uint8 pixels of the given ids of a prepared split, in the order given."""
    table = pq.ParquetDataset(split_files(data_dir, split), filters=pc.field("id").isin(list(ids))).read(
        columns=["id", "image"])
    position = {row_id: i for i, row_id in enumerate(table.column("id").to_pylist())}
    missing = [i for i in ids if i not in position]
    if missing:
        raise UserError(f"id {missing[0]!r} is not in the {split} split of {data_dir}")
    return table_images(table)[[position[i] for i in ids]]


def up_to_date(run_dir: str | os.PathLike, name: str, identity: dict[str, Any]) -> bool:
    folder = embeddings_dir(run_dir, name)
    try:
        recorded = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recorded == identity and all((folder / f"{split}.parquet").is_file() for split in SPLITS)


def ensure_embeddings(data_dir: str, run_dir: str, sources: list[ModelSource], batch_size: int,
                      use_gpu: str = "auto", num_actors: int = 0) -> list[str]:
    """Embed every split with every source whose embeddings are missing or stale; returns the names embedded."""
    fingerprint = data_fingerprint(data_dir)
    todo = [s for s in sources if not up_to_date(run_dir, s.name, s.identity(fingerprint))]
    for source in sources:
        if source not in todo:
            log(f"{source.name}: embeddings up to date ({embeddings_dir(run_dir, source.name)}); skipping")
    if not todo:
        return []
    plan = actor_plan(use_gpu, num_actors)
    for source in todo:
        embeddings_dir(run_dir, source.name).mkdir(parents=True, exist_ok=True)
        (embeddings_dir(run_dir, source.name) / SOURCE_FILE).unlink(missing_ok=True)  # stale until rewritten
    started = time.perf_counter()
    log(f"embedding every split with {', '.join(s.name for s in todo)} on {plan['actors']} "
        f"{'GPU' if plan['on_gpu'] else 'CPU'} actor(s)")
    merged = stream_embeddings(data_dir, todo, plan, batch_size)
    for i, source in enumerate(todo):
        folder = embeddings_dir(run_dir, source.name)
        for split, table in merged.items():
            write_split(folder / f"{split}.parquet", table["id"], table["label"], table[f"embedding_{i}"])
        write_json(folder / SOURCE_FILE, source.identity(fingerprint))  # last: marks the folder complete
    rows, seconds = sum(len(t["id"]) for t in merged.values()), time.perf_counter() - started
    log(f"embedded {rows} images with {len(todo)} model(s) in {seconds:.1f} s "
        f"({rows * len(todo) / seconds:.0f} embeddings/s) -> {embeddings_dir(run_dir, '*')}")
    return [s.name for s in todo]
