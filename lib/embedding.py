"""Embedding with a network of a run, and the embeddings store (no Ray: the actor pool is :mod:`onray.embed`).

Store, per model ``NAME`` (a backbone, ``<backbone>-untrained`` or ``stacked``)::

    RUN/embeddings/NAME/{train,val,test}.parquet   id: string, label: int64, embedding: float32[D]
    RUN/embeddings/NAME/source.json                what produced them; written last (= complete)

Rows are sorted by id, so the same split of every model has the same rows in the same order
(stacking relies on it). ``source.json`` holds the :class:`ModelSource` (with its checkpoint's
SHA-256) and the prepared data's fingerprint; unchanged models are not embedded again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lib.augment import as_tensor, normalize, resize_batch
from lib.backbones import EmbeddingNet, build_model, check_backbones, fetch_imagenet_weights
from lib.config import from_dict
from lib.data.reader import SPLITS, table_ids
from lib.errors import UserError
from lib.io import atomic_path, read_json
from lib.parquet import read_parquet, write_parquet
from lib.paths import RunPaths
from lib.precision import forward, prepare_for_bf16, uses_bf16
from lib.training import TrainConfig

SOURCE_FILE = "source.json"
FORMAT_VERSION = 2


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
        return {"format": FORMAT_VERSION, "model": dataclasses.asdict(self), "data_manifest_sha256": data_fingerprint}

    @classmethod
    def recorded(cls, source_json: dict[str, Any]) -> ModelSource | None:
        """The model a ``source.json`` records; None for a model that embeds no images (``stacked``)."""
        model = source_json.get("model")
        return from_dict(cls, model, source="source.json") if isinstance(model, dict) else None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(weights: str) -> str:
    """SHA-256 of a weights file; empty for ``none`` and ``imagenet``."""
    return "" if weights in ("none", "imagenet") or not Path(weights).is_file() else file_sha256(weights)


def trained_config(run: RunPaths, backbone: str) -> TrainConfig:
    """The resolved training config a finished backbone of ``run`` was trained with."""
    return from_dict(TrainConfig, read_json(run.model(backbone) / "config.json"),
                     source=str(run.model(backbone) / "config.json"))


def model_sources(run_dir: str | os.PathLike, backbones: tuple[str, ...], include_untrained: bool,
                  weights: str, embedding_dim: int, image_size: int, seed: int,
                  precision: str = "auto") -> list[ModelSource]:
    """The networks to evaluate: trained models in ``RUN/models/<b>/`` (complete = ``summary.json``),
    restricted to ``backbones`` when given; a listed backbone without a trained model is evaluated
    untrained (``weights``, ``embedding_dim``, ``image_size``); ``include_untrained`` adds each trained
    backbone's untrained network (its config's initial weights and seed)."""
    run = RunPaths.of(run_dir)
    trained = run.trained_backbones()
    if backbones:
        check_backbones(backbones)
    elif not trained:
        raise UserError(f"no trained models in {run.models} (no <backbone>/summary.json): run jobs.train first, "
                        f"or pass --backbones NAME[,NAME] to evaluate untrained networks (--weights none|imagenet)")
    sources = []
    for backbone in backbones or tuple(trained):
        if backbone not in trained:
            sources.append(ModelSource(f"{backbone}-untrained", backbone, weights, embedding_dim, image_size, seed,
                                       precision, checkpoint_sha256=weights_sha256(weights)))
            continue
        config = trained_config(run, backbone)
        model = run.model(backbone) / "model.pt"
        sources.append(ModelSource(backbone, backbone, str(model), config.embedding_dim, config.image_size,
                                   config.seed, precision, trained=True, checkpoint_sha256=file_sha256(model)))
        if include_untrained:
            sources.append(ModelSource(f"{backbone}-untrained", backbone, config.weights, config.embedding_dim,
                                       config.image_size, config.seed, precision, baseline=True,
                                       checkpoint_sha256=weights_sha256(config.weights)))
    for source in sources:
        if source.weights == "imagenet":
            fetch_imagenet_weights(source.backbone)  # offline: one clear line now, not inside every actor
        elif source.weights != "none" and not Path(source.weights).is_file():
            raise UserError(f"weights file not found: {source.weights} (for {source.name}; use --weights "
                            f"none, imagenet or a file path)")
    return sources


def check_loadable(sources: list[ModelSource]) -> None:
    """Load every weights file of ``sources`` here, so a wrong or damaged file is one :class:`UserError` in the
    driver before any Ray work, not a failure inside every embedding actor."""
    for source in sources:
        if source.weights not in ("none", "imagenet"):
            build_model(source.backbone, source.weights, source.embedding_dim)


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


# Images staged to the GPU per step by embed_with_models at 224 px (the normalised float32 chunk: 256 x 0.6 MB);
# smaller inputs take proportionally more per step (device_chunk), up to MAX_DEVICE_CHUNK.
DEVICE_CHUNK = 256
MAX_DEVICE_CHUNK = 4096


def device_chunk(image_sizes: list[int], device: torch.device) -> int:
    """Images per step for ``device``: on a GPU, :data:`DEVICE_CHUNK` at 224 px scaled by the pixels of the largest
    input (32 px: 4,096), so a step's activations stay near the same size; on the CPU, the whole batch Ray Data
    handed over (its cores are busy either way)."""
    if device.type != "cuda":
        return MAX_DEVICE_CHUNK
    side = max(image_sizes, default=224)
    return int(min(MAX_DEVICE_CHUNK, max(16, DEVICE_CHUNK * (224 / side) ** 2)))


def _staged_chunks(images: np.ndarray, device: torch.device, chunk: int) -> Iterator[torch.Tensor]:
    """``images`` (N, H, W, 3) uint8 as device tensors of ``chunk`` rows. On a GPU each chunk is copied from pinned
    memory on a side stream while the previous one computes (the copy of chunk i + 1 overlaps the forward passes
    of chunk i); the compute stream waits on each copy before it reads it."""
    host = as_tensor(images)
    if device.type != "cuda":
        for start in range(0, len(host), chunk):
            yield host[start:start + chunk].to(device)
        return
    copier = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def stage(start: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        pinned = host[start:start + chunk].pin_memory()
        with torch.cuda.stream(copier):
            on_device = pinned.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(copier)
        return on_device, ready

    upcoming = stage(0) if len(host) else None
    for start in range(0, len(host), chunk):
        current, ready = upcoming
        upcoming = stage(start + chunk) if start + chunk < len(host) else None
        compute.wait_event(ready)
        current.record_stream(compute)  # the copier's memory is now the compute stream's to free
        yield current


def embed_with_models(models: list[EmbeddingNet], sources: list[ModelSource], images: np.ndarray,
                      device: torch.device, bf16: list[bool], chunk: int | None = None) -> list[np.ndarray]:
    """(N, H, W, 3) uint8 -> one (N, D_i) float32 array of unit vectors per model, each batch decoded to the device
    once for all models and resized and normalised once per distinct ``image_size`` among them (not once per
    model). The results stay on the device until the end: one host copy per model."""
    chunk = chunk or device_chunk([source.image_size for source in sources], device)
    outputs: list[list[torch.Tensor]] = [[] for _ in models]
    sizes = sorted({source.image_size for source in sources})
    with torch.inference_mode():
        for stored in _staged_chunks(images, device, chunk):
            inputs = {size: normalize(resize_batch(stored, size)) for size in sizes}
            for i, (model, source) in enumerate(zip(models, sources, strict=True)):
                outputs[i].append(forward(model, inputs[source.image_size], bf16[i]).float())
    return [torch.cat(parts).cpu().numpy() if parts else np.zeros((0, model.embedding_dim), np.float32)
            for parts, model in zip(outputs, models, strict=True)]


def embed_loop(source: ModelSource, model: EmbeddingNet, images: np.ndarray, batch_size: int,
               device: str | torch.device = "cpu") -> np.ndarray:
    """The plain-PyTorch path: :func:`embed_images` with ``source``'s model (on ``device``) over
    ``images`` in batches, in this process."""
    device = torch.device(device)
    bf16 = uses_bf16(source.precision, device)
    chunks = [embed_images(model, images[i:i + batch_size], source.image_size, device, bf16)
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.embedding_dim), np.float32)


# --------------------------------------------------------------------------- the store


def write_split(path: Path, ids: np.ndarray, labels: np.ndarray, embeddings: np.ndarray) -> None:
    """One split's embeddings as Parquet, rows sorted by id, written atomically."""
    order = np.argsort(np.asarray(ids).astype(str), kind="stable")
    embeddings = np.ascontiguousarray(embeddings[order], dtype=np.float32)
    table = pa.table({"id": pa.array(np.asarray(ids).astype(str)[order], pa.string()),
                      "label": pa.array(np.asarray(labels)[order], pa.int64()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel(), pa.float32()),
                                                                     embeddings.shape[1])})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_parquet(table, tmp)


@dataclass(frozen=True)
class SplitEmbeddings:
    """One model's embeddings of one split, row i of each array about the same image: ``ids`` (N,) str,
    ``labels`` (N,) int64, ``vectors`` (N, D) float32."""

    ids: np.ndarray
    labels: np.ndarray
    vectors: np.ndarray


def read_embeddings(run_dir: str | os.PathLike, name: str, split: str) -> SplitEmbeddings:
    """One model's stored embeddings of one split."""
    path = RunPaths.of(run_dir).embeddings(name) / f"{split}.parquet"
    if not path.is_file():
        raise UserError(f"no embeddings for model {name!r}: {path} is missing (run jobs.evaluate)")
    table = read_parquet(path)
    column = table.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    return SplitEmbeddings(table_ids(table), table.column("label").to_numpy(), vectors)


def up_to_date(run_dir: str | os.PathLike, name: str, identity: dict[str, Any]) -> bool:
    folder = RunPaths.of(run_dir).embeddings(name)
    try:
        recorded = json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recorded == identity and all((folder / f"{split}.parquet").is_file() for split in SPLITS)
