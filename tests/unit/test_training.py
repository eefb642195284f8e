import json

import numpy as np
import pytest

from lib.config import parse_config
from lib.errors import UserError
from lib.training import PRESETS, TrainConfig, per_class_subset, warmup_cosine

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


def test_per_class_subset_is_stratified_and_seeded():
    ids = np.array([f"img{i}" for i in range(100)], dtype=object)
    labels = np.arange(100) % 4
    chosen = per_class_subset(ids, labels, 5, seed=0)
    assert len(chosen) == 20
    assert sorted(np.bincount([int(c[3:]) % 4 for c in chosen])) == [5, 5, 5, 5]
    assert list(chosen) == list(per_class_subset(ids, labels, 5, seed=0))
    assert len(per_class_subset(ids, labels, 0, seed=0)) == 100
