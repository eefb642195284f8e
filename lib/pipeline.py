"""``jobs.pipeline``'s config: its own settings, and those of ``jobs.prepare`` and ``jobs.train`` it passes through.

The passed-through settings are named once here (:data:`PREPARE_SETTINGS`, :data:`TRAIN_SETTINGS`) and taken
from ``PrepareConfig`` and ``TrainConfig`` with their types, defaults and help (:func:`lib.config.fields_from`):
the pipeline's ``--epochs`` is ``jobs.train``'s ``--epochs``. The stages themselves run in :mod:`onray.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.backbones import check_backbones
from lib.config import borrowed, check_ranges, fields_from, option
from lib.paths import RunPaths
from lib.prepare import PrepareConfig
from lib.training import TrainConfig

DEFAULT_BACKBONES = ("densenet121", "resnet50", "vgg16")
# jobs.prepare's settings the pipeline passes through; its data_dir is RUN/data and its seed the pipeline's
PREPARE_SETTINGS = ("source", "val_fraction", "skip_bad_images", "max_side")
# jobs.train's settings the pipeline passes through to every backbone's training (None: the preset's value);
# tuned keys from a best.json win over them. Adding a training flag to the pipeline = adding its name here.
TRAIN_SETTINGS = ("preset", "weights", "num_workers", "use_gpu", "precision", "augment_on", "cache_budget", "gpus_per_worker",
                  "image_size", "embedding_dim", "epochs", "batch_size", "lr", "loss", "loss_params", "margin",
                  "miner", "train_per_class", "val_per_class", "patience", "mlflow")


@dataclass(frozen=True)
@fields_from(TrainConfig, TRAIN_SETTINGS, heading="training (jobs.train's flags; tuned keys from best.json win)")
@fields_from(PrepareConfig, PREPARE_SETTINGS, heading="data (jobs.prepare's flags)")
class PipelineConfig:
    """Prepare the data, optionally tune, train every backbone concurrently and evaluate, under one RUN."""

    run_dir: str = option(help="run folder: data, models, tune and eval all go under it")
    backbones: tuple[str, ...] = option(DEFAULT_BACKBONES, help="backbones to train and stack")
    tune: bool = option(False, help="search margin and lr per backbone with jobs.tune (its preset's trial sizes), "
                                    "then train each backbone with its best.json")
    include_untrained: bool = option(True, help="also evaluate each backbone's untrained network")
    # run_dir, backbones above and these have jobs.train's names but reach the other stages too (their help
    # says how), so they are declared here
    storage: str = option("", help="Ray Train/Tune storage: a path or s3://... (default: inside RUN)")
    seed: int = option(0, help="seed of the val split, subsets and initialisation")

    def __post_init__(self) -> None:
        check_backbones(self.backbones)
        check_ranges(self, non_negative=("seed",))
        # the checks jobs.prepare and jobs.train make, now rather than after preparing the data
        self.prepare_config()
        self.train_config()

    def prepare_config(self) -> PrepareConfig:
        """``jobs.prepare``'s config of this run: DATA is ``RUN/data``."""
        return PrepareConfig(data_dir=str(RunPaths.of(self.run_dir).data), seed=self.seed,
                             **borrowed(self, PrepareConfig))

    def train_config(self, backbones: tuple[str, ...] = (), hparams: str = "") -> TrainConfig:
        """``jobs.train``'s config of ``backbones`` (default: all of them), with ``hparams`` (a best.json) if any."""
        return TrainConfig(data_dir=str(RunPaths.of(self.run_dir).data), run_dir=self.run_dir,
                           backbones=backbones or self.backbones, hparams=hparams, storage=self.storage,
                           seed=self.seed, **borrowed(self, TrainConfig))
