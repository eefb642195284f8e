"""Triplet loss with online mining, on pytorch-metric-learning's contracts.

distances -> mined (anchor, positive, negative) index tuples under ``no_grad`` -> per-triplet
losses -> an explicit reduction (mean over triplets that still violate the margin). The fraction of
active triplets and the spread of the embeddings are returned with the loss, so a stall (no active
triplets) or a collapse (every image mapped to one point) shows in the per-epoch metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pytorch_metric_learning import distances, losses, miners, reducers

Miner = Literal["semihard", "hard", "all", "easy"]
# Below this mean pairwise distance (unit vectors: 0 = one point, ~1.41 = spread over the sphere)
# the embedding has collapsed.
COLLAPSE_SPREAD = 0.05


@dataclass
class TripletStats:
    """Per-batch diagnostics: ``triplets`` mined, ``active`` with positive loss, out of ``valid``
    (a, p, n) label-valid triplets in the batch; ``spread`` = mean pairwise distance of embeddings.

    ``active``, ``valid`` and ``spread`` are 0-d tensors on the embeddings' device, so a training loop can sum
    them over an epoch and read them once (reading one is a host sync: on a GPU it waits for the step)."""

    triplets: int
    active: torch.Tensor
    valid: torch.Tensor
    spread: torch.Tensor

    @property
    def active_fraction(self) -> float:
        return float(self.active) / float(self.valid) if float(self.valid) else 0.0


def valid_triplets(labels: torch.Tensor) -> torch.Tensor:
    """Number of (anchor, positive, negative) index triples with label[a] == label[p] != label[n], a != p, as a
    0-d int64 tensor on the labels' device: each row has (same - 1) positives and (N - same) negatives."""
    same = (labels[:, None] == labels[None, :]).sum(dim=1)
    return ((same - 1) * (len(labels) - same)).sum()


def count_valid_triplets(labels: torch.Tensor) -> int:
    """:func:`valid_triplets` as a Python int."""
    return int(valid_triplets(labels))


def pairwise_spread(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance over distinct pairs of rows of (N, D) ``embeddings``: a 0-d float32 tensor on
    their device (0 for fewer than two rows)."""
    n = len(embeddings)
    if n < 2:
        return torch.zeros((), device=embeddings.device)
    with torch.no_grad():
        dist = torch.cdist(embeddings.float(), embeddings.float())
        return dist.sum() / (n * (n - 1))


def mean_pairwise_distance(embeddings: torch.Tensor) -> float:
    """:func:`pairwise_spread` as a Python float."""
    return float(pairwise_spread(embeddings))


class TripletObjective:
    """Triplet margin loss on L2-normalised embeddings (Euclidean distance), mined in each batch.

    ``miner``: ``semihard`` (negatives farther than the positive but within the margin), ``hard``
    (negatives closer than the positive), ``all`` (every triplet violating the margin), ``easy``.
    """

    def __init__(self, margin: float = 0.2, miner: Miner = "semihard"):
        self.margin = margin
        self.distance = distances.LpDistance(normalize_embeddings=True, p=2)
        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=miner, distance=self.distance)
        self.loss = losses.TripletMarginLoss(margin=margin, distance=self.distance,
                                             reducer=reducers.DoNothingReducer())

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, TripletStats]:
        """(N, D) embeddings and (N,) labels -> (scalar loss with grad, stats).

        The loss is the mean over active triplets, computed without reading their count on the host (the
        miner's index tuples are the one wait a step has here: pytorch-metric-learning builds them with
        ``torch.where``)."""
        embeddings = embeddings.float()
        with torch.no_grad():
            triplets = self.miner(embeddings, labels)
        per_triplet = self.loss(embeddings, labels, triplets)["loss"]["losses"]
        if not torch.is_tensor(per_triplet) or per_triplet.numel() == 0:
            # no triplets: a zero that still belongs to the graph, so every DDP rank runs backward
            loss = embeddings.sum() * 0.0
            active = torch.zeros((), dtype=torch.int64, device=embeddings.device)
        else:
            positive = per_triplet > 0
            active = positive.sum()
            # the mean over active triplets; with none, a zero that keeps the graph
            loss = torch.where(positive, per_triplet, 0.0).sum() / active.clamp(min=1)
        stats = TripletStats(triplets=len(triplets[0]), active=active, valid=valid_triplets(labels),
                             spread=pairwise_spread(embeddings.detach()))
        return loss, stats
