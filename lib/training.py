"""Training configuration, presets and the pieces of the training loop that need no Ray.

``TrainConfig`` is the one typed config of ``jobs.train`` (and of each ``jobs.tune`` trial). Fields
left as ``None`` take their value from the preset; ``resolve()`` fills them in, and the resolved
config is what runs and what is written next to the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lib.augment import AugmentSettings, augment_batch, normalize
from lib.backbones import check_backbones
from lib.batching import StreamLayout
from lib.config import check_ranges, from_dict, option, parse_size, to_dict
from lib.devices import USE_GPU_HELP, UseGpu, gpu_share
from lib.errors import UserError
from lib.losses import (
    OBJECTIVES,
    LossParams,
    Miner,
    Objective,
    build_objective,
    check_objective,
    pairwise_spread,
)
from lib.precision import PRECISION_HELP, Precision, forward
from lib.tracking import MLFLOW_HELP

Preset = Literal["smoke", "quick", "full"]
AugmentOn = Literal["device", "data"]
AUGMENT_ON_HELP = ("device: Ray Data carries the stored images and the train worker augments and resizes them on its "
                   "GPU or CPU; data: Ray Data map tasks augment and resize on CPUs")

# Defaults per preset. quick and smoke train from scratch on CPUs; full fine-tunes ImageNet weights on GPUs.
# quick's miner and learning rate were chosen by measurement (from scratch at 32 px,
# semi-hard mining learned nothing in 4 epochs; all margin-violating triplets did).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(weights="none", image_size=32, embedding_dim=32, epochs=1, batch_size=16, samples_per_class=4,
                  lr=2e-3, weight_decay=1e-4, warmup_epochs=0.0, margin=0.2, miner="all", train_per_class=16,
                  val_per_class=8, patience=0),
    "quick": dict(weights="none", image_size=32, embedding_dim=128, epochs=12, batch_size=128, samples_per_class=16,
                  lr=2e-3, weight_decay=1e-4, warmup_epochs=1.0, margin=0.2, miner="all", train_per_class=500,
                  val_per_class=100, patience=3),
    "full": dict(weights="imagenet", image_size=224, embedding_dim=128, epochs=30, batch_size=256,
                 samples_per_class=16, lr=3e-4, weight_decay=1e-4, warmup_epochs=2.0, margin=0.2, miner="semihard",
                 train_per_class=0, val_per_class=0, patience=5),
}
# Per-backbone exceptions to a preset, so that ``quick`` fits its time budget for every backbone
# (jobs.train resolves each backbone's config on its own). Set by measurement; see README "Results".
BACKBONE_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # VGG16 has no batch norm and diverges from scratch at the preset's lr: on 200 images per class for
    # 3 epochs, val mAP@5 went 0.115 -> 0.093 at lr 2e-3, -> 0.155 at 5e-4, -> 0.187 at 2e-4, -> 0.181 at 1e-4.
    # At 2e-4 it learns slowly: val P@5 +13.5 points after 6 epochs, +16.8 after 10 (best epoch 9;
    # 4.6 min alone on 2 cores in bf16), so it gets 10 epochs.
    ("quick", "vgg16"): dict(epochs=10, lr=2e-4),
}
# Keys a tuning result (best.json) may set.
HPARAM_KEYS = ("margin", "lr", "miner", "embedding_dim", "weight_decay", "loss")
CACHE_BUDGET_HELP = ("memory a worker may fill with its train rows (--augment-on device): a shard that fits stays on "
                     "the device, a larger one streams from Ray Data every epoch, with the same batches; a size "
                     "(512MB, 4GB; 0 always streams) or auto: half the free GPU memory, or half the free RAM shared "
                     "by the node's workers")
# auto's share of the free memory: the rest is the network's, its activations' and Ray Data's
CACHE_SHARE = 0.5
METRIC = "val_map@5"  # the metric early stopping, checkpoint ranking and Tune all maximise
METRIC_MODE = "max"


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tune backbones with a metric-learning loss on Ray Train, streaming augmented data from Ray Data."""

    data_dir: str = option(help="prepared data set (jobs.prepare's DATA)")
    run_dir: str = option(help="run folder; models go to RUN/models/<backbone>/")
    backbones: tuple[str, ...] = option(("resnet50",), help="comma-separated backbones to train concurrently")
    preset: Preset = option("quick", help="smoke: seconds, for tests; quick: a CPU run in minutes; full: GPUs")
    weights: str = option("", help="imagenet | none | PATH to a state dict (default: by preset)")
    hparams: str = option("", help="best.json from jobs.tune: overrides margin, lr and the other tuned keys")
    num_workers: int | None = option(None, help="Ray Train workers per backbone (default: 1, or GPUs/backbones)")
    use_gpu: UseGpu = option("auto", help=USE_GPU_HELP)
    precision: Precision = option("auto", help=PRECISION_HELP)
    augment_on: AugmentOn = option("device", help=AUGMENT_ON_HELP)
    cache_budget: str = option("auto", help=CACHE_BUDGET_HELP)
    gpus_per_worker: str = option("auto", help="GPU share of each worker: auto (GPUs / backbones when that is below 1, "
                                               "so several backbones train on one GPU) or a number in (0, 1]")
    image_size: int | None = option(None, help="input side in pixels: 32 native, 128/224 for ImageNet weights")
    embedding_dim: int | None = option(None, help="embedding size D")
    epochs: int | None = option(None, help="maximum epochs")
    batch_size: int | None = option(None, help="batch size per worker")
    samples_per_class: int | None = option(None, help="images per class in a batch (P x K batches)")
    lr: float | None = option(None, help="peak learning rate (AdamW, warm-up then cosine decay)")
    weight_decay: float | None = option(None, help="AdamW weight decay")
    warmup_epochs: float | None = option(None, help="linear warm-up length in epochs")
    loss: str = option("triplet", help=f"training objective: {', '.join(OBJECTIVES)} (lib.losses)")
    margin: float | None = option(None, help="triplet margin (Euclidean distance on unit vectors)")
    miner: Miner | None = option(None, help="triplet mining: semihard, hard, all or easy")
    loss_params: LossParams = option(default_factory=LossParams, help="settings of the other objectives")
    train_per_class: int | None = option(None, help="train images per class (0 = all)")
    val_per_class: int | None = option(None, help="val images per class for the per-epoch mAP@5 (0 = all)")
    patience: int | None = option(None, help="stop after this many epochs without a better val mAP@5 (0 = never)")
    max_failures: int = option(2, help="worker-group restarts from the last checkpoint before giving up")
    storage: str = option("", help="Ray Train storage for checkpoints: a path or s3://... (default: RUN/models)")
    seed: int = option(0, help="seed for subsets and initialisation")
    inject_failure: str = option("", help="testing aid, BACKBONE:EPOCH: a worker of that backbone raises once "
                                          "at that epoch")
    mlflow: str = option("", help=MLFLOW_HELP)

    def __post_init__(self) -> None:
        check_backbones(self.backbones)
        check_objective(self.loss)
        if len(set(self.backbones)) != len(self.backbones):
            raise UserError(f"backbone listed twice in --backbones {','.join(self.backbones)}")
        check_ranges(self, positive=("num_workers", "image_size", "embedding_dim", "epochs", "batch_size", "lr",
                                     "margin"),
                     non_negative=("weight_decay", "warmup_epochs", "train_per_class", "val_per_class", "patience",
                                   "max_failures", "seed"))
        if self.image_size is not None and self.image_size < 16:
            raise UserError(f"--image-size must be at least 16, got {self.image_size}")
        if self.inject_failure and (self.inject_failure.count(":") != 1
                                    or not self.inject_failure.split(":")[1].isdigit()):
            raise UserError(f"--inject-failure must look like BACKBONE:EPOCH, got {self.inject_failure!r}")
        if self.samples_per_class is not None and self.samples_per_class < 2:
            raise UserError(f"--samples-per-class must be at least 2, got {self.samples_per_class}")
        gpu_share(self.gpus_per_worker)  # auto or a number in (0, 1]
        if self.cache_budget != "auto":
            parse_size(self.cache_budget, "--cache-budget")

    def resolve(self) -> TrainConfig:
        """This config with every ``None`` replaced from the preset and ``--hparams`` applied.

        A single-backbone config also takes that backbone's :data:`BACKBONE_PRESETS` entry.
        """
        values = {k: v for k, v in dataclasses.asdict(self).items()}
        preset = dict(PRESETS[self.preset])
        if len(self.backbones) == 1:
            preset.update(BACKBONE_PRESETS.get((self.preset, self.backbones[0]), {}))
        for key, value in preset.items():
            if values[key] is None or values[key] == "":
                values[key] = value
        if self.hparams:
            for key, value in load_hparams(self.hparams).items():
                values[key] = value
        values["hparams"] = ""  # applied; the resolved config stands on its own
        if values["batch_size"] < 2 * values["samples_per_class"]:
            raise UserError(f"--batch-size {values['batch_size']} must hold at least two classes of "
                            f"--samples-per-class {values['samples_per_class']}")
        return from_dict(TrainConfig, values, source="resolved training config")

    def for_backbone(self, backbone: str) -> TrainConfig:
        return dataclasses.replace(self, backbones=(backbone,))

    @property
    def backbone(self) -> str:
        return self.backbones[0]


def load_hparams(path: str | Path) -> dict[str, Any]:
    """Read a tuning result (``best.json``): its keys in :data:`HPARAM_KEYS` override the config.

    A file that is missing, not JSON, or sets no known key is a :class:`UserError`.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"hyper-parameter file not found: {path}") from None
    except ValueError:
        raise UserError(f"hyper-parameter file is not JSON: {path}") from None
    config = data.get("config", data) if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise UserError(f"hyper-parameter file must hold a JSON object: {path}")
    chosen = {k: config[k] for k in HPARAM_KEYS if k in config}
    if not chosen:
        raise UserError(f"hyper-parameter file sets none of {', '.join(HPARAM_KEYS)}: {path}")
    return chosen


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up from ~0 to 1, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int,
                   objective: Objective | None = None
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases and norm layers) with a per-step warm-up + cosine schedule.

    The objective's own parameters (proxies), if any, form a third group at ``lr`` times its
    :attr:`~lib.losses.Objective.parameter_lr_factor`, without weight decay (the losses read them by cosine
    similarity: decay would only shrink them and so speed up their steps); the schedule scales every group."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    own = [parameter for parameter in objective.parameters() if parameter.requires_grad] if objective else []
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr": cfg.lr * objective.parameter_lr_factor})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
    return optimizer, scheduler


@dataclass(frozen=True)
class WorkerContext:
    """What the driver hands each Ray Train worker of one run: the resolved config of one backbone,
    ``num_classes``, ``rows_per_worker`` (train rows in each worker's shard: the LR schedule's step count),
    ``trainers_per_node`` (trainers sharing each machine's cores), ``progress`` (the driver's progress board,
    an actor handle, or None: the worker logs a line now and then instead), and for ``--augment-on device`` the
    train split's ``train_units`` (its Parquet row groups, or slices of them, as ``(file, row group, first
    row, rows)``: the workers' shards are drawn from them) and the stored ``image_shape`` (H, W, 3).

    It crosses into the worker as plain values (:meth:`as_loop_config`, Ray Train's ``train_loop_config``) and
    is rebuilt and checked there by :meth:`from_loop_config`, the worker's first line."""

    train: TrainConfig
    num_classes: int
    rows_per_worker: int
    trainers_per_node: int = 1
    progress: Any = None
    train_units: tuple[tuple[str, int, int, int], ...] = ()
    image_shape: tuple[int, ...] = ()

    def as_loop_config(self) -> dict[str, Any]:
        return {"train": to_dict(self.train), "num_classes": self.num_classes, "rows_per_worker": self.rows_per_worker,
                "trainers_per_node": self.trainers_per_node, "progress": self.progress,
                "train_units": [list(unit) for unit in self.train_units], "image_shape": list(self.image_shape)}

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]) -> WorkerContext:
        """The context from :meth:`as_loop_config`'s dict; a missing or unknown key, or a bad training value,
        raises at once (a :class:`UserError` naming it)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(config) != sorted(names):
            raise UserError(f"train_loop_config has keys {', '.join(sorted(config))}; expected {', '.join(names)}")
        train = from_dict(TrainConfig, config["train"], source="train_loop_config")
        return cls(train, int(config["num_classes"]), int(config["rows_per_worker"]),
                   int(config["trainers_per_node"]), config["progress"],
                   tuple((str(file), int(group), int(start), int(rows))
                         for file, group, start, rows in config["train_units"]),
                   tuple(int(side) for side in config["image_shape"]))


@dataclass
class Training:
    """Everything one training run steps, built by :func:`build_training` (the Ray Train worker, each Tune
    trial's workers and the train benchmark's plain loop all use it).

    ``model`` and ``objective`` are the plain modules on the device (what is evaluated and saved);
    ``model_step`` and ``objective_step`` are what the training step calls: the same modules, or their DDP
    wrappers in a multi-worker Ray Train run (an objective is wrapped only when it has parameters)."""

    model: torch.nn.Module
    objective: Objective
    model_step: torch.nn.Module
    objective_step: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    bf16: bool
    samples_per_class: int  # K of the P x K batches: at least enough for --batch-size over all classes
    steps_per_epoch: int  # the batches the loader really yields (P x K rows each): the LR schedule counts these

    def train_state(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint's ``train_state.pt`` (the model's weights go to ``model.pt`` on their own)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "objective": self.objective.state_dict(), "history": history}

    def restore(self, model_state: dict[str, Any], train_state: dict[str, Any]) -> list[dict[str, Any]]:
        """Load a checkpoint (:func:`lib.checkpoints.load_train_state`'s pair) into these parts, proxies
        included; returns its history."""
        self.model.load_state_dict(model_state)
        self.objective.load_state_dict(train_state["objective"])
        self.optimizer.load_state_dict(train_state["optimizer"])
        self.scheduler.load_state_dict(train_state["scheduler"])
        return train_state["history"]


def build_training(cfg: TrainConfig, num_classes: int, rows: int, device: torch.device,
                   wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Training:
    """The model (``cfg.backbone`` with ``cfg.weights``), objective (``cfg.loss``), AdamW + schedule and
    precision of one training run, seeded by ``cfg.seed``, on ``device``.

    ``rows``: train rows this worker sees per epoch (sizes the LR schedule). ``wrap`` prepares a module for
    distributed training and moves it to ``device`` (the Ray worker passes ``ray.train.torch.prepare_model``);
    without it the modules are moved to ``device`` as they are."""
    from lib.backbones import build_model
    from lib.batching import planned_steps
    from lib.precision import prepare_for_bf16, uses_bf16

    torch.manual_seed(cfg.seed)
    bf16 = uses_bf16(cfg.precision, device)
    model = prepare_for_bf16(build_model(cfg.backbone, cfg.weights, cfg.embedding_dim), bf16)
    objective = build_objective(cfg, num_classes)
    model_step = wrap(model) if wrap else model.to(device)
    model = getattr(model_step, "module", model_step) if wrap else model
    has_parameters = any(parameter.requires_grad for parameter in objective.parameters())
    objective_step = wrap(objective) if wrap and has_parameters else objective.to(device)
    objective = getattr(objective_step, "module", objective_step)
    samples_per_class = max(cfg.samples_per_class, -(-cfg.batch_size // num_classes))
    steps_per_epoch = max(1, planned_steps(rows, num_classes, cfg.batch_size, samples_per_class))
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch, objective)
    return Training(model, objective, model_step, objective_step, optimizer, scheduler, bf16, samples_per_class,
                    steps_per_epoch)


# The totals every epoch has (summed over steps, and over ranks by the Ray worker); each objective adds its
# own stat_names after them.
BASE_TOTALS = ("loss_sum", "steps", "images", "spread_sum")


def total_names(objective: Objective) -> tuple[str, ...]:
    """The names of the totals :func:`train_epoch` returns for ``objective``, in order."""
    return (*BASE_TOTALS, *objective.stat_names)


def train_epoch(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], objective: torch.nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                device: torch.device, bf16: bool, on_step: Callable[[int, torch.Tensor], None] | None = None) -> dict[str, float]:
    """One training pass over ``batches`` of ``{"image": (B, 3, S, S) uint8, "label": (B,)}``; returns the
    totals named by :func:`total_names`: loss, steps, images, spread of the embeddings and the objective's stats,
    each summed over the steps. The Ray Train worker and the plain-PyTorch benchmark both run it.

    ``objective`` is an :class:`~lib.losses.Objective` or its DDP wrapper. Images are normalised on ``device``. The totals stay a float64 tensor on ``device`` until the
    epoch ends and are read once, so a step never waits for the GPU to report its loss. ``on_step(step, totals)``
    is called after every step with that tensor: reading it (``float(totals[0])``) waits for the GPU, so read it
    rarely.
    """
    names = getattr(objective, "module", objective).stat_names  # through a DDP wrapper
    model.train()
    totals = torch.zeros(len(BASE_TOTALS) + len(names), dtype=torch.float64, device=device)
    one = torch.ones((), dtype=torch.float64, device=device)
    for step, batch in enumerate(batches, start=1):
        images = normalize(batch["image"].to(device, non_blocking=True))
        embeddings = forward(model, images, bf16)
        loss, stats = objective(embeddings, batch["label"].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        totals += torch.stack([loss.detach().double(), one, one * len(images),
                               pairwise_spread(embeddings.detach()).double(),
                               *(stats[name].double() for name in names)])
        if on_step is not None:
            on_step(step, totals)
    return dict(zip((*BASE_TOTALS, *names), totals.cpu().tolist(), strict=True))


def epoch_metrics(totals: dict[str, float], objective: Objective) -> dict[str, float]:
    """The epoch row's training columns from :func:`train_epoch`'s totals (summed over ranks): ``train_loss`` and
    ``spread`` (means over steps) and the objective's own (:meth:`~lib.losses.Objective.epoch_metrics`)."""
    steps = max(1.0, totals["steps"])
    return {"train_loss": totals["loss_sum"] / steps, "spread": totals["spread_sum"] / steps,
            **objective.epoch_metrics(totals)}


def augmented_batches(images: torch.Tensor, labels: torch.Tensor, batch_index: np.ndarray | torch.Tensor,
                      settings: AugmentSettings, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of one epoch on the training device: ``batch_index`` (steps, B) rows of the stored (N, H, W, 3)
    uint8 ``images`` and (N,) ``labels`` (from :func:`lib.batching.epoch_batches`), each gathered and augmented
    (resize included) where the images are: ``{"image": (B, 3, S, S) uint8, "label": (B,)}``."""
    index = torch.as_tensor(batch_index, dtype=torch.long).to(images.device, non_blocking=True)
    for rows in index:
        yield {"image": augment_batch(images.index_select(0, rows), settings, generator),
               "label": labels.index_select(0, rows)}


def streamed_batches(batch_index: np.ndarray, labels: np.ndarray, unit_sizes: np.ndarray | list[int],
                     layout: StreamLayout, arriving: Iterable[tuple[int, torch.Tensor]], image_shape: tuple[int, ...],
                     settings: AugmentSettings, generator: torch.Generator, device: torch.device
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`augmented_batches` of ``batch_index`` (steps, B) over rows that are never all in memory: the same
    batches, pixel for pixel, from a buffer of ``layout.capacity`` rows on ``device``.

    ``arriving`` yields ``(unit, images)`` in ``layout.read_order``: each unit's (rows, H, W, 3) uint8 images of
    ``image_shape`` (pinned, on a GPU), as read from storage; ``labels`` (N,) are every row's, known beforehand
    (the plan was made from them). A unit is copied into its places before its first step and stays there until
    its last (:func:`lib.batching.stream_layout`)."""
    starts = np.concatenate([[0], np.cumsum(np.asarray(unit_sizes, dtype=np.int64))[:-1]])
    buffer = torch.empty((max(1, layout.capacity), *image_shape), dtype=torch.uint8, device=device)
    slots = torch.as_tensor(layout.slot[batch_index], dtype=torch.long).to(device, non_blocking=True)
    batch_labels = torch.as_tensor(np.asarray(labels)[batch_index], dtype=torch.long).to(device, non_blocking=True)
    arriving, pending = iter(arriving), list(layout.read_order)[::-1]
    for step, rows in enumerate(slots):
        while pending and layout.first_step[pending[-1]] <= step:
            unit, images = next(arriving)
            if unit != pending[-1]:
                raise RuntimeError(f"unit {unit} arrived where unit {pending[-1]} was due: the stream is out of order")
            pending.pop()
            place = int(layout.slot[starts[unit]])
            buffer[place:place + len(images)].copy_(images, non_blocking=True)
        yield {"image": augment_batch(buffer.index_select(0, rows), settings, generator), "label": batch_labels[step]}


def cache_budget_bytes(setting: str, free_bytes: int, sharing: int = 1) -> int:
    """The bytes of train rows a worker may keep in memory under ``--cache-budget`` ``setting``: its size, or for
    ``auto`` :data:`CACHE_SHARE` of ``free_bytes`` (the device's free memory, or the node's free RAM) split
    between the ``sharing`` workers that draw on it."""
    if setting == "auto":
        return int(CACHE_SHARE * free_bytes / max(1, sharing))
    return parse_size(setting, "--cache-budget")


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The history row with the highest :data:`METRIC` among trained epochs (epoch >= 1)."""
    trained = [row for row in history if row.get("epoch", 0) >= 1 and row.get(METRIC) is not None]
    return max(trained, key=lambda row: row[METRIC]) if trained else None


def val_retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, k: int = 5,
                          device: torch.device | str = "cpu") -> dict[str, float]:
    """``val_map@5`` and ``val_p@5`` of (N, D) unit ``embeddings`` under protocol L (self excluded), searched exactly
    with torch on ``device`` (the training worker's): a worker never creates faiss GPU resources, which live outside
    torch's allocator and abort the process on GPUs faiss's wheel has no kernels for."""
    from lib.retrieval.metrics import map_at_k, precision_at_k
    from lib.retrieval.torch_search import torch_knn

    _, neighbours = torch_knn(embeddings, embeddings, min(k, len(labels) - 1), exclude_self=True, device=device)
    neighbour_labels = np.asarray(labels)[neighbours]
    k = neighbour_labels.shape[1]
    return {"val_map@5": map_at_k(neighbour_labels, labels, k), "val_p@5": precision_at_k(neighbour_labels, labels, k)}
