import json

import numpy as np
import pytest

from lib.config import parse_config
from lib.errors import UserError
from lib.training import PRESETS, TrainConfig, warmup_cosine

BASE = ["--data-dir", "D", "--run-dir", "R"]


def test_preset_fills_what_flags_leave_open():
    cfg = parse_config(TrainConfig, [*BASE, "--preset", "quick", "--lr", "0.01"]).resolve()
    assert cfg.lr == 0.01 and cfg.epochs == PRESETS["quick"]["epochs"] and cfg.weights == "none"
    assert parse_config(TrainConfig, [*BASE, "--preset", "full"]).resolve().weights == "imagenet"


def test_a_backbone_preset_entry_applies_to_that_backbone_alone(monkeypatch):
    import lib.training

    monkeypatch.setitem(lib.training.BACKBONE_PRESETS, ("quick", "vgg16"), {"epochs": 3})
    quick = PRESETS["quick"]["epochs"]
    assert TrainConfig(data_dir="d", run_dir="r", backbones=("vgg16",)).resolve().epochs == 3
    assert TrainConfig(data_dir="d", run_dir="r", backbones=("resnet50",)).resolve().epochs == quick
    assert TrainConfig(data_dir="d", run_dir="r", backbones=("vgg16",), epochs=5).resolve().epochs == 5  # flag wins
    assert TrainConfig(data_dir="d", run_dir="r", backbones=("vgg16",), preset="smoke").resolve().epochs == 1


def test_hparams_file_overrides_tuned_keys(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"config": {"margin": 0.35, "lr": 0.004}, "val_map@5": 0.4}))
    cfg = parse_config(TrainConfig, [*BASE, "--hparams", str(best), "--margin", "0.1"]).resolve()
    assert (cfg.margin, cfg.lr, cfg.hparams) == (0.35, 0.004, "")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(UserError, match="sets none of margin, lr"):
        parse_config(TrainConfig, [*BASE, "--hparams", str(tmp_path / "empty.json")]).resolve()
    with pytest.raises(UserError, match="hyper-parameter file not found"):
        parse_config(TrainConfig, [*BASE, "--hparams", str(tmp_path / "none.json")]).resolve()


@pytest.mark.parametrize("argv, message", [
    (["--backbones", "resnet50,alexnet"], "unknown backbone(s) alexnet"),
    (["--backbones", "vgg16,vgg16"], "listed twice"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--miner", "random"], "'random' is not one of semihard, hard, all, easy"),
    (["--batch-size", "16", "--samples-per-class", "16"], "must hold at least two classes"),
])
def test_bad_training_flags(argv, message):
    with pytest.raises(UserError) as err:
        parse_config(TrainConfig, [*BASE, *argv]).resolve()
    assert message in str(err.value)


def test_warmup_then_cosine():
    factors = [warmup_cosine(step, 100, 10) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] < 0.01


def test_the_lr_schedule_counts_the_p_by_k_batches_the_loader_yields():
    """The full preset: batch 256 with 26 images per class is 9 x 26 = 234 rows, so 45,000 train images give
    192 steps an epoch; a schedule sized by 45,000 // 256 = 175 would reach zero in epoch 28 of 30."""
    from lib.batching import epoch_batches, planned_steps

    full = TrainConfig(data_dir="d", run_dir="r", preset="full", weights="none").resolve()
    k = max(full.samples_per_class, -(-full.batch_size // 10))
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 4500))
    yielded = len(epoch_batches(labels, full.batch_size, k, seed=0))
    assert planned_steps(45_000, 10, full.batch_size, k) == yielded == 192
    assert 45_000 // full.batch_size == 175
    total, warmup = full.epochs * yielded, round(full.warmup_epochs * yielded)
    assert warmup_cosine(total - 1, total, warmup) > 0  # the last step still learns
    assert warmup_cosine(28 * yielded, total, warmup) > 0.005
    assert warmup_cosine(28 * yielded, full.epochs * 175, round(full.warmup_epochs * 175)) == 0.0  # the old count


def test_balanced_stream_stops_at_the_planned_steps():
    import torch

    from lib.batching import balanced_batches, planned_steps

    labels = torch.from_numpy(np.random.default_rng(1).permutation(np.repeat(np.arange(10), 60)))
    stream = ({"image": labels[i:i + 50].view(-1, 1), "label": labels[i:i + 50]} for i in range(0, 600, 50))
    plan = planned_steps(600, 10, 64, 8)
    assert plan == 600 // 10 // 8 * 10 // 8 == 8
    assert len(list(balanced_batches(stream, 64, 8, seed=0, max_steps=plan - 3))) == plan - 3


def test_epoch_totals_kept_on_the_device_equal_per_step_reads():
    """train_epoch sums loss, spread and the objective's stats (triplet counts) as tensors and reads them once;
    the old loop read every step with .item() (and counted valid triplets with torch.unique). Same numbers."""
    import copy

    import torch

    from lib.losses import TripletObjective, mean_pairwise_distance
    from lib.training import epoch_metrics, total_names, train_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=generator),
                "label": torch.arange(3).repeat_interleave(4)} for _ in range(5)]
    objective = TripletObjective(margin=0.5, miner="all")

    def optimiser(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    seen = []
    totals = train_epoch(model, batches, objective, *optimiser(model), torch.device("cpu"), False,
                         on_step=lambda step, t: seen.append(float(t[1])))
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert tuple(totals) == total_names(objective) == ("loss_sum", "steps", "images", "spread_sum", "mined",
                                                       "active", "valid")

    from lib.augment import normalize

    optimizer, scheduler = optimiser(reference)
    expected = dict.fromkeys(totals, 0.0)
    for batch in batches:
        embeddings = reference(normalize(batch["image"]))
        loss, stats = objective(embeddings, batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        _, counts = torch.unique(batch["label"], return_counts=True)
        valid = int((counts * (counts - 1) * (len(batch["label"]) - counts)).sum())
        for name, value in (("loss_sum", loss.item()), ("steps", 1), ("images", len(batch["label"])),
                            ("spread_sum", mean_pairwise_distance(embeddings.detach())),
                            ("mined", int(stats["mined"])), ("active", int(stats["active"])), ("valid", valid)):
            expected[name] += value
    assert totals["active"] > 0 and totals["valid"] == 5 * 288
    np.testing.assert_allclose(list(totals.values()), list(expected.values()), rtol=1e-6)
    row = epoch_metrics(totals, objective)
    assert row == pytest.approx({"train_loss": expected["loss_sum"] / 5, "spread": expected["spread_sum"] / 5,
                                 "active_fraction": expected["active"] / expected["valid"]})


def test_the_worker_context_crosses_as_plain_values_and_is_checked_on_arrival():
    from lib.config import to_dict
    from lib.training import WorkerContext

    cfg = TrainConfig(data_dir="d", run_dir="r", preset="smoke", loss="proxy_anchor").resolve()
    context = WorkerContext(cfg, num_classes=10, rows_per_worker=400, trainers_per_node=2)
    config = context.as_loop_config()
    assert json.loads(json.dumps(config)) == config  # plain values only (progress is None here)
    assert WorkerContext.from_loop_config(config) == context
    with pytest.raises(UserError, match="train_loop_config has keys .*rows_per_workr.*; expected"):
        WorkerContext.from_loop_config({**{k: v for k, v in config.items() if k != "rows_per_worker"},
                                        "rows_per_workr": 400})
    with pytest.raises(UserError, match="unknown key 'marginn' in train_loop_config"):
        WorkerContext.from_loop_config({**config, "train": {**to_dict(cfg), "marginn": 0.1}})
    with pytest.raises(UserError, match="unknown loss 'arcfac'"):
        WorkerContext.from_loop_config({**config, "train": {**to_dict(cfg), "loss": "arcfac"}})
