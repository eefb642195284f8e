import itertools

import pytest
import torch

from lib.losses import TripletObjective, count_valid_triplets, mean_pairwise_distance


def test_valid_triplets_of_a_hand_table():
    # labels [0, 0, 1, 1, 2]: anchors 0,1 (class 0) x their one positive x 3 negatives = 6,
    # anchors 2,3 (class 1) likewise = 6, anchor 4 has no positive: 12 triplets.
    labels = torch.tensor([0, 0, 1, 1, 2])
    enumerated = [(a, p, n) for a, p, n in itertools.permutations(range(5), 3)
                  if labels[a] == labels[p] and labels[n] != labels[a]]
    assert len(enumerated) == count_valid_triplets(labels) == 12


def test_all_miner_loss_equals_hand_computed_mean():
    # unit vectors on a circle; Euclidean distances between them are known in closed form
    angles = torch.tensor([0.0, 0.3, 1.2, 1.6, 3.0])
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2])
    margin = 0.5
    dist = torch.cdist(embeddings.detach(), embeddings.detach())
    violations = []
    for a, p, n in itertools.permutations(range(5), 3):
        if labels[a] == labels[p] and labels[n] != labels[a]:
            value = float(dist[a, p] - dist[a, n] + margin)
            if value > 0:
                violations.append(value)
    loss, stats = TripletObjective(margin=margin, miner="all")(embeddings, labels)
    assert stats["valid"] == 12 and stats["active"] == len(violations) == stats["mined"]
    assert loss.item() == pytest.approx(sum(violations) / len(violations), rel=1e-5)
    loss.backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_no_triplets_gives_a_zero_loss_with_a_graph():
    embeddings = torch.nn.functional.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    objective = TripletObjective(miner="hard")
    loss, stats = objective(embeddings, torch.tensor([0, 1, 2, 3]))  # no positives
    totals = {name: float(value) for name, value in stats.items()}
    assert loss.item() == 0.0 and totals["mined"] == 0 and objective.epoch_metrics(totals)["active_fraction"] == 0.0
    loss.backward()


def test_spread_detects_collapse():
    same = torch.nn.functional.normalize(torch.ones(8, 4), dim=1)
    assert mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-6)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert mean_pairwise_distance(opposite) == pytest.approx(2.0)
