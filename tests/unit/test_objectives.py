"""Every registered objective learns on a separable batch, reports the stats it declares, and a proxy
objective's parameters are trained (their own optimiser group), saved and checked by name."""

import pytest
import torch

from lib.errors import UserError
from lib.losses import OBJECTIVES, build_objective, register_objective
from lib.training import TrainConfig, make_optimizer

BUILT_IN = ("triplet", "multi_similarity", "proxy_anchor", "supcon")
# the column(s) each built-in objective adds to an epoch row
EPOCH_COLUMNS = {"triplet": {"active_fraction"}, "multi_similarity": {"mined_pair_fraction", "similarity_gap"},
                 "proxy_anchor": {"proxy_accuracy"}, "supcon": {"similarity_gap"},
                 "triplet_ce": {"active_fraction", "classifier_accuracy"}}


def config(loss: str, **values) -> TrainConfig:
    return TrainConfig(data_dir="d", run_dir="r", loss=loss, **{"preset": "smoke", **values}).resolve()


def separable_batch(classes: int = 4, per_class: int = 6, dim: int = 12, seed: int = 0):
    """Inputs around one random centre per class, noisy enough that a random projection mixes the classes but
    a trained one separates them."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + 1.3 * torch.randn(len(labels), dim, generator=generator), labels


def precision_at_1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose most similar other row has their label."""
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    return float((labels[similarity.argmax(dim=1)] == labels).float().mean())


def test_the_mission_loss_and_three_pml_losses_are_registered():
    assert set(BUILT_IN) <= set(OBJECTIVES)
    assert TrainConfig(data_dir="d", run_dir="r").loss == "triplet"  # the default objective
    assert TrainConfig(data_dir="d", run_dir="r", preset="quick").resolve().loss == "triplet"  # the quick preset's


@pytest.mark.parametrize("name", sorted(OBJECTIVES))  # every registered objective, a new one too
def test_each_objective_learns_a_separable_batch_and_reports_its_stats(name):
    torch.manual_seed(0)
    inputs, labels = separable_batch()
    cfg = config(name, embedding_dim=8, lr=0.01)
    model = torch.nn.Sequential(torch.nn.Linear(inputs.shape[1], 8))
    objective = build_objective(cfg, num_classes=4)
    optimizer, _ = make_optimizer(model, cfg, steps_per_epoch=30, objective=objective)

    def loss_now() -> float:
        with torch.no_grad():
            return float(objective(torch.nn.functional.normalize(model(inputs)), labels)[0])

    before = loss_now()
    with torch.no_grad():
        assert precision_at_1(model(inputs), labels) < 0.7  # the classes start mixed
    for _ in range(30):
        loss, stats = objective(torch.nn.functional.normalize(model(inputs)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_now() < 0.7 * before, (name, before, loss_now())
    with torch.no_grad():
        assert precision_at_1(model(inputs), labels) == 1.0  # and end apart
    assert set(stats) == set(objective.stat_names)
    assert all(torch.is_tensor(value) and value.ndim == 0 for value in stats.values())
    row = objective.epoch_metrics({key: float(value) for key, value in stats.items()})
    assert set(row) == EPOCH_COLUMNS.get(name, set(row)) and all(isinstance(v, float) for v in row.values())
    if name == "triplet_ce":
        assert row["classifier_accuracy"] == 1.0  # the cosine classifier separates the classes too
    if name == "proxy_anchor":
        assert row["proxy_accuracy"] == 1.0  # every input now nearest its own class's proxy
    if "similarity_gap" in row:
        assert row["similarity_gap"] > 0.5  # positives clearly more similar than negatives


def test_proxies_are_parameters_in_their_own_optimiser_group_and_in_the_state_dict():
    cfg = config("proxy_anchor", embedding_dim=8, lr=1e-3)
    objective = build_objective(cfg, num_classes=5)
    proxies = objective.loss.proxies
    assert proxies.shape == (5, 8) and proxies.requires_grad
    assert list(objective.state_dict()) == ["loss.proxies"]
    model = torch.nn.Linear(3, 8)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch=4, objective=objective)
    group = optimizer.param_groups[-1]
    assert group["params"] == [proxies] and group["weight_decay"] == 0.0
    assert group["lr"] == pytest.approx(cfg.lr * cfg.loss_params.proxy_lr_factor * scheduler.get_last_lr()[0]
                                        / cfg.lr)
    before = proxies.detach().clone()
    loss, _ = objective(model(torch.randn(6, 3)), torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, proxies.detach())  # the optimiser steps them
    # objectives without weights of their own add no group
    assert len(make_optimizer(model, cfg, 4, build_objective(config("supcon"), 5))[0].param_groups) == 2


def test_an_unknown_loss_is_one_line_naming_the_known_ones():
    with pytest.raises(UserError) as err:
        TrainConfig(data_dir="d", run_dir="r", loss="arcface")
    message = str(err.value)
    assert message.startswith("unknown loss 'arcface' (known: ") and all(name in message for name in BUILT_IN)
    assert "\n" not in message


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="objective 'triplet' is already registered"):
        register_objective("triplet")(lambda cfg, num_classes: None)


def test_loss_params_are_checked_and_nested_in_the_config():
    from lib.config import parse_config, to_dict

    cfg = parse_config(TrainConfig, ["--data-dir", "d", "--run-dir", "r", "--loss", "supcon",
                                     "--loss-params-temperature", "0.2"])
    assert (cfg.loss, cfg.loss_params.temperature, cfg.loss_params.ms_beta) == ("supcon", 0.2, 50.0)
    assert to_dict(cfg)["loss_params"]["temperature"] == 0.2
    with pytest.raises(UserError, match="--loss-params-temperature must be positive, got 0.0"):
        parse_config(TrainConfig, ["--data-dir", "d", "--run-dir", "r", "--loss-params-temperature", "0"])


def test_jobs_train_with_an_unknown_loss_exits_2_with_one_line(capsys, tmp_path):
    from jobs import train

    code = train.cli(["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--loss", "arcface"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "unknown loss 'arcface' (known: " in lines[0]
