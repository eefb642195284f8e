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
    (a, p, n) label-valid triplets in the batch; ``spread`` = mean pairwise distance of embeddings."""

    triplets: int
    active: int
    valid: int
    spread: float

    @property
    def active_fraction(self) -> float:
        return self.active / self.valid if self.valid else 0.0


def count_valid_triplets(labels: torch.Tensor) -> int:
    """Number of (anchor, positive, negative) index triples with label[a] == label[p] != label[n], a != p."""
    _, counts = torch.unique(labels, return_counts=True)
    counts = counts.long()
    return int((counts * (counts - 1) * (len(labels) - counts)).sum())


def mean_pairwise_distance(embeddings: torch.Tensor) -> float:
    """Mean Euclidean distance over distinct pairs of rows of (N, D) ``embeddings``."""
    n = len(embeddings)
    if n < 2:
        return 0.0
    with torch.no_grad():
        dist = torch.cdist(embeddings.float(), embeddings.float())
        return float(dist.sum() / (n * (n - 1)))


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
        """(N, D) embeddings and (N,) labels -> (scalar loss with grad, stats)."""
        embeddings = embeddings.float()
        with torch.no_grad():
            triplets = self.miner(embeddings, labels)
        per_triplet = self.loss(embeddings, labels, triplets)["loss"]["losses"]
        if not torch.is_tensor(per_triplet) or per_triplet.numel() == 0:
            # no triplets: a zero that still belongs to the graph, so every DDP rank runs backward
            loss = embeddings.sum() * 0.0
            active = 0
        else:
            positive = per_triplet > 0
            active = int(positive.sum())
            loss = per_triplet[positive].mean() if active else per_triplet.sum() * 0.0
        stats = TripletStats(triplets=len(triplets[0]), active=active, valid=count_valid_triplets(labels),
                             spread=mean_pairwise_distance(embeddings.detach()))
        return loss, stats
