"""Training objectives: a registry of metric-learning losses on pytorch-metric-learning's contracts.

``--loss NAME`` picks one. Each is a registered builder ``build(cfg, num_classes) -> Objective``, where ``cfg``
is the resolved :class:`lib.training.TrainConfig` (it reads its own settings there: ``--margin``/``--miner``
for the triplet loss, ``cfg.loss_params`` for the others, ``cfg.embedding_dim`` for proxies)::

    @register_objective("my_loss")
    def my_loss(cfg, num_classes):
        return MyObjective(cfg.loss_params.temperature)

An :class:`Objective` is a ``torch.nn.Module``: a loss with weights of its own (proxies) holds them as
parameters, so the optimiser steps them (:attr:`Objective.parameter_lr_factor` sets their learning rate
against ``--lr``), DDP averages their gradients and the checkpoint saves them. Its ``forward`` returns the
loss and a dict of named 0-d tensors (:attr:`Objective.stat_names`) that the training loop sums over an
epoch; :meth:`Objective.epoch_metrics` turns those sums into the epoch row's columns (the triplet loss's
``active_fraction``: a stall, no active triplets, shows there). The spread of the embeddings (collapse:
every image on one point) is measured for every objective by the loop itself.

The pml pattern throughout: distances -> mined index tuples under ``no_grad`` -> per-tuple losses -> an
explicit reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import torch
from pytorch_metric_learning import distances, losses, miners, reducers

from lib.config import option
from lib.errors import UserError

if TYPE_CHECKING:
    from lib.training import TrainConfig

Miner = Literal["semihard", "hard", "all", "easy"]
# Below this mean pairwise distance (unit vectors: 0 = one point, ~1.41 = spread over the sphere)
# the embedding has collapsed.
COLLAPSE_SPREAD = 0.05
# The learning rate of proxies against the network's: the Proxy Anchor paper's official code trains its proxies
# at 100 x the network's learning rate (they start random and must reach the class clusters quickly).
PROXY_LR_FACTOR = 100.0


@dataclass(frozen=True)
class LossParams:
    """Settings of the objectives other than the triplet loss (which takes ``--margin`` and ``--miner``);
    nested in :class:`lib.training.TrainConfig` as ``loss_params`` (flags ``--loss-params-<name>``).
    Defaults are pytorch-metric-learning's."""

    ms_alpha: float = option(2.0, help="multi_similarity: scale of the positive-pair term (alpha)")
    ms_beta: float = option(50.0, help="multi_similarity: scale of the negative-pair term (beta)")
    ms_base: float = option(0.5, help="multi_similarity: the similarity the pair terms are centred on (lambda)")
    ms_epsilon: float = option(0.1, help="multi_similarity: the miner keeps pairs within this of the hardest one")
    proxy_margin: float = option(0.1, help="proxy_anchor: margin on the cosine similarity to a proxy (delta)")
    proxy_alpha: float = option(32.0, help="proxy_anchor: scale of the similarities (alpha)")
    proxy_lr_factor: float = option(PROXY_LR_FACTOR, help="proxy_anchor: the proxies' learning rate as a multiple "
                                                          "of --lr")
    temperature: float = option(0.1, help="supcon: softmax temperature of the similarities")
    ce_weight: float = option(1.0, help="triplet_ce: weight of the auxiliary classification term against the "
                                        "triplet loss")
    ce_scale: float = option(16.0, help="triplet_ce: scale of the cosine-classifier logits (a softmax temperature "
                                        "of 1/scale)")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, may_be_zero = getattr(self, f.name), f.name in ("ms_base", "ms_epsilon", "proxy_margin")
            if value < 0 or (value == 0 and not may_be_zero):
                raise UserError(f"--loss-params-{f.name.replace('_', '-')} must be "
                                f"{'0 or more' if may_be_zero else 'positive'}, got {value}")


class Objective(torch.nn.Module):
    """A training loss: ``forward((N, D) embeddings, (N,) labels) -> (scalar loss with grad, stats)``.

    ``stats`` maps each name in :attr:`stat_names` to a 0-d tensor on the embeddings' device (summed over an
    epoch's steps, and over DDP ranks, without a host read per step). Parameters of the objective (proxies)
    are trained with the network, at ``--lr`` times :attr:`parameter_lr_factor`.
    """

    stat_names: tuple[str, ...] = ()
    parameter_lr_factor: float = 1.0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def epoch_metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        """The epoch row's columns from the epoch's sums of :attr:`stat_names` (``totals`` also holds ``steps``
        and ``images``)."""
        return {}


ObjectiveBuilder = Callable[["TrainConfig", int], Objective]
OBJECTIVES: dict[str, ObjectiveBuilder] = {}


def register_objective(name: str) -> Callable[[ObjectiveBuilder], ObjectiveBuilder]:
    """Register ``build(cfg, num_classes) -> Objective`` under ``name`` (``--loss name``); names are unique."""

    def decorate(build: ObjectiveBuilder) -> ObjectiveBuilder:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = build
        return build

    return decorate


def check_objective(name: str) -> None:
    """A :class:`UserError` naming the registered objectives when ``name`` is not one."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown loss {name!r} (known: {', '.join(sorted(OBJECTIVES))})")


def build_objective(cfg: TrainConfig, num_classes: int) -> Objective:
    """The objective ``cfg.loss`` names, for ``num_classes`` classes, on the CPU."""
    check_objective(cfg.loss)
    return OBJECTIVES[cfg.loss](cfg, num_classes)


def _count(value: int, device: torch.device) -> torch.Tensor:
    return torch.full((), value, dtype=torch.int64, device=device)


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


@torch.no_grad()
def similarity_sums(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums and counts of the cosine similarities of positive pairs (same label, i != j) and negative pairs of
    (N, D) ``embeddings``: ``positive_similarity``, ``positive_pairs``, ``negative_similarity``,
    ``negative_pairs`` as 0-d tensors (for :func:`similarity_gap`)."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    similarity = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    return {"positive_similarity": (similarity * positive).sum(), "positive_pairs": positive.sum(),
            "negative_similarity": (similarity * negative).sum(), "negative_pairs": negative.sum()}


def similarity_gap(totals: Mapping[str, float]) -> float:
    """Mean cosine similarity of positive pairs minus that of negative pairs, from :func:`similarity_sums`
    summed over steps: 0 for an untrained (or collapsed) embedding, up to 2 for perfectly separated classes."""
    return (totals["positive_similarity"] / max(1.0, totals["positive_pairs"])
            - totals["negative_similarity"] / max(1.0, totals["negative_pairs"]))


SIMILARITY_STATS = ("positive_similarity", "positive_pairs", "negative_similarity", "negative_pairs")


class TripletObjective(Objective):
    """Triplet margin loss on L2-normalised embeddings (Euclidean distance), mined in each batch.

    ``miner``: ``semihard`` (negatives farther than the positive but within the margin), ``hard``
    (negatives closer than the positive), ``all`` (every triplet violating the margin), ``easy``.
    Stats: ``mined`` triplets, ``active`` ones (positive loss) and ``valid`` (a, p, n) label-valid triplets
    in the batch; the epoch's ``active_fraction`` = active / valid.
    """

    stat_names = ("mined", "active", "valid")

    def __init__(self, margin: float = 0.2, miner: Miner = "semihard"):
        super().__init__()
        self.margin = margin
        self.distance = distances.LpDistance(normalize_embeddings=True, p=2)
        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=miner, distance=self.distance)
        self.loss = losses.TripletMarginLoss(margin=margin, distance=self.distance,
                                             reducer=reducers.DoNothingReducer())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss is the mean over active triplets, computed without reading their count on the host (the
        miner's index tuples are the one wait a step has here: pytorch-metric-learning builds them with
        ``torch.where``)."""
        embeddings = embeddings.float()
        with torch.no_grad():
            triplets = self.miner(embeddings, labels)
        per_triplet = self.loss(embeddings, labels, triplets)["loss"]["losses"]
        if not torch.is_tensor(per_triplet) or per_triplet.numel() == 0:
            # no triplets: a zero that still belongs to the graph, so every DDP rank runs backward
            loss = embeddings.sum() * 0.0
            active = _count(0, embeddings.device)
        else:
            positive = per_triplet > 0
            active = positive.sum()
            # the mean over active triplets; with none, a zero that keeps the graph
            loss = torch.where(positive, per_triplet, 0.0).sum() / active.clamp(min=1)
        return loss, {"mined": _count(len(triplets[0]), embeddings.device), "active": active,
                      "valid": valid_triplets(labels)}

    def epoch_metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        return {"active_fraction": totals["active"] / max(1.0, totals["valid"])}


class MultiSimilarityObjective(Objective):
    """Multi-similarity loss (cosine similarity) on the pairs its miner keeps: positives less similar than the
    hardest negative plus epsilon, negatives more similar than the hardest positive minus epsilon.
    Stats: ``mined_pairs`` out of all ordered ``pairs`` of the batch, and the similarity sums of
    :func:`similarity_sums`; the epoch's ``mined_pair_fraction`` and ``similarity_gap``."""

    stat_names = ("mined_pairs", "pairs", *SIMILARITY_STATS)

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1):
        super().__init__()
        self.miner = miners.MultiSimilarityMiner(epsilon=epsilon)
        self.loss = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embeddings = embeddings.float()
        with torch.no_grad():
            pairs = self.miner(embeddings, labels)
        loss = self.loss(embeddings, labels, pairs)  # pml's reducer: a graph-connected zero when nothing is mined
        n = len(labels)
        return loss, {"mined_pairs": _count(len(pairs[0]) + len(pairs[2]), embeddings.device),
                      "pairs": _count(n * (n - 1), embeddings.device), **similarity_sums(embeddings, labels)}

    def epoch_metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        return {"mined_pair_fraction": totals["mined_pairs"] / max(1.0, totals["pairs"]),
                "similarity_gap": similarity_gap(totals)}


class ProxyAnchorObjective(Objective):
    """Proxy Anchor loss: one learned proxy per class (a ``(num_classes, D)`` parameter, ``loss.proxies``),
    each pulling its class's embeddings in and pushing the others out (cosine similarity).
    Stats: ``nearest_proxy_correct``, the embeddings whose most similar proxy is their class's, out of
    ``embeddings``; the epoch's ``proxy_accuracy``."""

    stat_names = ("nearest_proxy_correct", "embeddings")

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0,
                 lr_factor: float = PROXY_LR_FACTOR):
        super().__init__()
        self.loss = losses.ProxyAnchorLoss(num_classes=num_classes, embedding_size=embedding_dim, margin=margin,
                                           alpha=alpha)
        self.parameter_lr_factor = lr_factor

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # float32 always: pml casts the proxies to the embeddings' dtype, and bf16 proxies would stay bf16
        embeddings = embeddings.float()
        loss = self.loss(embeddings, labels)
        with torch.no_grad():
            nearest = self.loss.get_logits(embeddings).argmax(dim=1)
        return loss, {"nearest_proxy_correct": (nearest == labels).sum(),
                      "embeddings": _count(len(labels), embeddings.device)}

    def epoch_metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        return {"proxy_accuracy": totals["nearest_proxy_correct"] / max(1.0, totals["embeddings"])}


class TripletClassifierObjective(TripletObjective):
    """The triplet loss plus an auxiliary classification term: a cosine classifier over the embedding (one
    learned unit weight vector per class, ``classifier``, logits = ``scale`` x cosine) trained with softmax
    cross-entropy, weighted by ``ce_weight``. The class term pulls every embedding towards its class's weight
    on each step, including the steps where few triplets are active; retrieval still uses the embedding alone.
    Stats: the triplet loss's, and ``classifier_correct`` out of ``embeddings``; the epoch's
    ``active_fraction`` and ``classifier_accuracy``."""

    stat_names = (*TripletObjective.stat_names, "classifier_correct", "embeddings")

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.2, miner: Miner = "all",
                 ce_weight: float = 1.0, scale: float = 16.0):
        super().__init__(margin, miner)
        self.classifier = torch.nn.Parameter(torch.randn(num_classes, embedding_dim) / embedding_dim ** 0.5)
        self.ce_weight, self.scale = ce_weight, scale
        # the class weights start random and must reach their classes within a few epochs (proxies, which
        # face the same start, train at PROXY_LR_FACTOR x): a tenth of that keeps them behind the network's pull
        self.parameter_lr_factor = PROXY_LR_FACTOR / 10

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        triplet_loss, stats = super().forward(embeddings, labels)
        unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
        logits = self.scale * unit @ torch.nn.functional.normalize(self.classifier, dim=1).T
        loss = triplet_loss + self.ce_weight * torch.nn.functional.cross_entropy(logits, labels)
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == labels).sum()
        return loss, {**stats, "classifier_correct": correct, "embeddings": _count(len(labels), embeddings.device)}

    def epoch_metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        return {**super().epoch_metrics(totals),
                "classifier_accuracy": totals["classifier_correct"] / max(1.0, totals["embeddings"])}


class SupConObjective(Objective):
    """Supervised contrastive loss: for every anchor, a softmax over its cosine similarities to the rest of
    the batch that puts the mass on its positives (``temperature`` sharpens it). Stats: the similarity sums of
    :func:`similarity_sums`; the epoch's ``similarity_gap``."""

    stat_names = SIMILARITY_STATS

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.loss = losses.SupConLoss(temperature=temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embeddings = embeddings.float()
        return self.loss(embeddings, labels), similarity_sums(embeddings, labels)

    def epoch_metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        return {"similarity_gap": similarity_gap(totals)}


@register_objective("triplet")
def triplet(cfg: TrainConfig, num_classes: int) -> Objective:
    return TripletObjective(cfg.margin, cfg.miner)


@register_objective("triplet_ce")
def triplet_ce(cfg: TrainConfig, num_classes: int) -> Objective:
    p = cfg.loss_params
    return TripletClassifierObjective(num_classes, cfg.embedding_dim, cfg.margin, cfg.miner, p.ce_weight, p.ce_scale)


@register_objective("multi_similarity")
def multi_similarity(cfg: TrainConfig, num_classes: int) -> Objective:
    p = cfg.loss_params
    return MultiSimilarityObjective(p.ms_alpha, p.ms_beta, p.ms_base, p.ms_epsilon)


@register_objective("proxy_anchor")
def proxy_anchor(cfg: TrainConfig, num_classes: int) -> Objective:
    p = cfg.loss_params
    return ProxyAnchorObjective(num_classes, cfg.embedding_dim, p.proxy_margin, p.proxy_alpha, p.proxy_lr_factor)


@register_objective("supcon")
def supcon(cfg: TrainConfig, num_classes: int) -> Objective:
    return SupConObjective(cfg.loss_params.temperature)
