"""Settings one job passes through to another are declared once (lib.config.fields_from): the pipeline's and
the tune's training flags are jobs.train's own fields, with its types, defaults and help."""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

import pytest

from lib.config import BORROWED_FROM, borrowed, fields_from, from_dict, option, parse_config, to_dict
from lib.errors import UserError
from lib.pipeline import PipelineConfig
from lib.prepare import PrepareConfig
from lib.training import TrainConfig
from tuning.run import TuneJobConfig

# Fields with a TrainConfig name that a config declares itself, because they mean more there (the help says how).
OWN_MEANINGS = {
    PipelineConfig: {"run_dir", "backbones", "storage", "seed"},
    TuneJobConfig: {"run_dir", "storage", "max_failures", "seed"},
}


def field_map(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("config", "source"), [
    (PipelineConfig, TrainConfig), (PipelineConfig, PrepareConfig), (TuneJobConfig, TrainConfig)])
def test_every_passed_through_field_is_the_sources_own(config, source):
    taken = [f for f in dataclasses.fields(config) if f.metadata.get(BORROWED_FROM) is source]
    assert taken, f"{config.__name__} takes nothing from {source.__name__}"
    hints, source_hints, source_fields = typing.get_type_hints(config), typing.get_type_hints(source), field_map(source)
    for f in taken:
        original = source_fields[f.name]
        assert hints[f.name] == source_hints[f.name], f.name
        assert (f.default, f.default_factory) == (original.default, original.default_factory), f.name
        assert f.metadata["help"] == original.metadata["help"] and f.metadata["help"], f.name


@pytest.mark.parametrize("config", sorted(OWN_MEANINGS, key=lambda c: c.__name__))
def test_no_training_field_is_copied_by_hand(config):
    """A TrainConfig name declared in the class itself must be one of its own meanings, with its own help."""
    train_fields = field_map(TrainConfig)
    own = {f.name: f for f in dataclasses.fields(config) if BORROWED_FROM not in f.metadata and f.name in train_fields}
    assert set(own) == OWN_MEANINGS[config]
    for name, f in own.items():
        assert f.metadata["help"] != train_fields[name].metadata["help"], f"{config.__name__}.{name} is a copy"


def test_the_pipeline_hands_its_settings_to_prepare_and_train():
    cfg = parse_config(PipelineConfig, ["--source", "imagefolder:/images", "--run-dir", "/runs/r", "--epochs", "3",
                                        "--lr", "0.01", "--miner", "hard", "--val-fraction", "0.2",
                                        "--backbones", "resnet50,vgg16", "--seed", "4"])
    train = cfg.train_config(("vgg16",), hparams="best.json")
    assert (train.epochs, train.lr, train.miner, train.backbones, train.hparams, train.seed) == (
        3, 0.01, "hard", ("vgg16",), "best.json", 4)
    assert (train.data_dir, train.run_dir) == ("/runs/r/data", "/runs/r")
    prepare = cfg.prepare_config()
    assert (prepare.source, prepare.val_fraction, prepare.seed, prepare.data_dir) == (
        "imagefolder:/images", 0.2, 4, "/runs/r/data")
    assert from_dict(PipelineConfig, to_dict(cfg)) == cfg  # a resolved pipeline.json rebuilds the same config


def test_jobs_train_checks_the_pipelines_training_settings_when_it_is_built():
    with pytest.raises(UserError, match="--image-size must be at least 16"):
        PipelineConfig(source="imagefolder:/images", run_dir="r", image_size=8)
    with pytest.raises(UserError, match="--batch-size"):
        parse_config(PipelineConfig, ["--source", "imagefolder:/i", "--run-dir", "r", "--batch-size", "0"])


def test_a_tune_passes_its_training_settings_to_every_trial_and_the_preset_fills_the_rest():
    cfg = TuneJobConfig(data_dir="/d", run_dir="/r", backbone="vgg16", image_size=64, epochs=None)
    base = cfg.train_config(epochs=4, patience=0)
    assert (base.image_size, base.epochs, base.patience, base.backbones, base.data_dir) == (64, 4, 0, ("vgg16",), "/d")
    assert cfg.train_config(epochs=4).epochs == 4
    assert TuneJobConfig(data_dir="/d", run_dir="/r", epochs=2).train_config(epochs=4).epochs == 2  # a flag wins
    with pytest.raises(UserError, match="unknown backbone"):
        TuneJobConfig(data_dir="/d", run_dir="/r", backbone="alexnet9")


def test_the_pipeline_help_shows_jobs_trains_flags_and_help(capsys, monkeypatch):
    from jobs import pipeline, train
    from lib.pipeline import TRAIN_SETTINGS

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping: each flag's help on one line
    helps = {}
    for job in (pipeline, train):
        with pytest.raises(SystemExit) as done:
            job.cli(["--help"])
        assert done.value.code == 0
        helps[job] = " ".join(capsys.readouterr().out.split())
    from lib.config import is_nested_config

    for name in TRAIN_SETTINGS:
        field = field_map(TrainConfig)[name]
        flag, text = "--" + name.replace("_", "-"), " ".join(field.metadata["help"].split())
        nested = is_nested_config(typing.get_type_hints(TrainConfig)[name])
        flags = [f"{flag}-{inner.name.replace('_', '-')}" for inner in dataclasses.fields(field.default_factory())] \
            if nested else [flag]  # a nested config's fields are flags of their own: --loss-params-temperature
        for job, shown in helps.items():
            assert all(f"{f} " in shown for f in flags) and text in shown, (job.__name__, name)
    assert "training (jobs.train's flags" in helps[pipeline]


# A toy pair: whatever the base config gains, a config that names the field has it, with its type and help.
@dataclass(frozen=True)
class Inner:
    """A nested settings block."""

    depth: int = option(2, help="how deep")


@dataclass(frozen=True)
class Base:
    """A base job."""

    data_dir: str = option(help="where the data is")
    mode: Literal["fast", "slow"] = option("fast", help="how to run")
    size: int | None = option(None, help="size (None: the preset's)")
    inner: Inner = option(default_factory=Inner, help="nested settings")
    added_later: float = option(0.5, help="a field added to the base after the derived config was written")


@dataclass(frozen=True)
@fields_from(Base, ("data_dir", "size", "added_later"), heading="base settings")
class Derived:
    """A job that passes some of Base's settings through."""

    out: str = option("o", help="output")


@dataclass(frozen=True)
@fields_from(Base, ("inner",))
class DerivedNested:
    """A job that passes Base's nested block through."""


def test_a_derived_config_takes_the_base_fields_it_names_with_their_types_defaults_and_help():
    assert [f.name for f in dataclasses.fields(Derived)] == ["out", "data_dir", "size", "added_later"]
    hints = typing.get_type_hints(Derived)
    assert (hints["size"], hints["added_later"]) == (int | None, float)
    cfg = parse_config(Derived, ["--data-dir", "D", "--added-later", "2", "--size", "7"])
    assert cfg == Derived(data_dir="D", size=7, added_later=2.0)
    assert borrowed(cfg, Base) == {"data_dir": "D", "size": 7, "added_later": 2.0}
    assert Base(**borrowed(cfg, Base)).added_later == 2.0
    with pytest.raises(UserError, match="required: --data-dir"):
        parse_config(Derived, [])  # required in the base, required here


def test_a_nested_dataclass_field_passes_through_as_its_own_type():
    assert typing.get_type_hints(DerivedNested)["inner"] is Inner
    assert DerivedNested().inner == Inner() and DerivedNested(inner=Inner(3)).inner.depth == 3
    assert dataclasses.fields(DerivedNested)[0].metadata["help"] == "nested settings"


def test_naming_a_field_the_base_lacks_or_declaring_it_twice_fails_at_import():
    with pytest.raises(TypeError, match="Base has no field"):
        fields_from(Base, ("sizes",))
    with pytest.raises(TypeError, match="declared in the class and taken from Base"):
        @fields_from(Base, ("mode",))
        class Twice:
            mode: str = "x"
