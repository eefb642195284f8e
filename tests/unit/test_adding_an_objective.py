"""Adding an objective is one registered function: this module adds one (with weights of its own) and trains a
smoke epoch with it through lib.training.build_training, touching no other file (docs/extending.md)."""

import numpy as np
import pytest
import torch

from lib.config import parse_config
from lib.losses import OBJECTIVES, Objective, register_objective
from lib.training import TrainConfig, WorkerContext, build_training, epoch_metrics, train_epoch
from tests.conftest import CLASSES, image_array


class CentrePull(Objective):
    """A throwaway objective: a learned centre per class; each embedding is pulled to its class's centre and
    pushed below zero cosine similarity from the others'."""

    stat_names = ("own_similarity", "embeddings")

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        self.centres = torch.nn.Parameter(torch.randn(num_classes, embedding_dim))
        self.parameter_lr_factor = 10.0

    def forward(self, embeddings, labels):
        similarity = torch.nn.functional.normalize(embeddings.float(), dim=1) @ torch.nn.functional.normalize(
            self.centres, dim=1).T
        own = similarity.gather(1, labels[:, None]).squeeze(1)
        others = similarity.masked_fill(torch.nn.functional.one_hot(labels, len(self.centres)).bool(), 0.0)
        loss = (1 - own).mean() + others.clamp(min=0).mean()
        return loss, {"own_similarity": own.detach().sum(), "embeddings": torch.tensor(len(labels))}

    def epoch_metrics(self, totals):
        return {"centre_similarity": totals["own_similarity"] / max(1.0, totals["embeddings"])}


@pytest.fixture
def centre_pull():
    @register_objective("centre_pull")
    def build(cfg, num_classes):
        return CentrePull(num_classes, cfg.embedding_dim)

    yield "centre_pull"
    del OBJECTIVES["centre_pull"]  # the registry is the process's: leave it as it was


def smoke_batches(training, cfg, per_class=16):
    from lib.augment import AugmentSettings, fresh_generator
    from lib.batching import epoch_batches
    from lib.training import augmented_batches

    images = torch.from_numpy(np.stack([image_array(name, i) for name in CLASSES for i in range(per_class)]))
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    index = epoch_batches(labels, cfg.batch_size, training.samples_per_class, seed=0)[:training.steps_per_epoch]
    return augmented_batches(images, labels, index, AugmentSettings(image_size=cfg.image_size),
                             fresh_generator(0, torch.device("cpu")))


def test_a_registered_objective_trains_a_smoke_epoch_with_its_own_weights(centre_pull, tmp_path):
    cfg = parse_config(TrainConfig, ["--data-dir", "d", "--run-dir", str(tmp_path), "--preset", "smoke",
                                     "--loss", centre_pull]).resolve()
    assert WorkerContext.from_loop_config(WorkerContext(cfg, 3, 48).as_loop_config()).train == cfg
    training = build_training(cfg, num_classes=len(CLASSES), rows=16 * len(CLASSES), device=torch.device("cpu"))
    assert isinstance(training.objective, CentrePull)
    centres = training.objective.centres
    assert training.optimizer.param_groups[-1]["params"] == [centres]
    before = centres.detach().clone()

    totals = train_epoch(training.model_step, smoke_batches(training, cfg), training.objective_step,
                         training.optimizer, training.scheduler, torch.device("cpu"), training.bf16)
    assert totals["steps"] == training.steps_per_epoch >= 2 and totals["embeddings"] == totals["images"]
    row = epoch_metrics(totals, training.objective)
    assert set(row) == {"train_loss", "spread", "centre_similarity"}
    assert np.isfinite(row["train_loss"]) and -1 <= row["centre_similarity"] <= 1 and row["spread"] > 0
    assert not torch.equal(before, centres.detach())  # its weights were trained with the network
    assert torch.equal(training.train_state(history=[{"epoch": 1}])["objective"]["centres"], centres.detach())


def test_without_its_registration_the_name_is_unknown():
    from lib.errors import UserError

    with pytest.raises(UserError, match="unknown loss 'centre_pull'"):
        TrainConfig(data_dir="d", run_dir="r", loss="centre_pull")
