from dataclasses import FrozenInstanceError, dataclass
from typing import Literal

import pytest

from lib.config import build_parser, from_dict, option, parse_config, to_dict
from lib.errors import UserError


@dataclass(frozen=True)
class Example:
    """An example job."""

    data_dir: str = option(help="where")
    epochs: int = option(3, help="how long")
    lr: float = option(1e-3)
    amp: bool = option(False)
    mode: Literal["fast", "slow"] = option("fast")
    backbones: tuple[str, ...] = option(("resnet50",))
    image_size: int | None = option(None)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_flags():
    cfg = parse_config(Example, ["--data-dir", "D", "--epochs", "7", "--amp", "--backbones", "vgg16,resnet50",
                                 "--image-size", "224", "--mode", "slow"])
    assert cfg == Example(data_dir="D", epochs=7, amp=True, backbones=("vgg16", "resnet50"), image_size=224,
                          mode="slow")


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    path = write(tmp_path, "data_dir: /d\nepochs: 5\nlr: 0.01\nimage-size: 32\n")
    cfg = parse_config(Example, ["--config", path, "--epochs", "9"])
    assert (cfg.data_dir, cfg.epochs, cfg.lr, cfg.image_size) == ("/d", 9, 0.01, 32)


def test_unknown_yaml_key_is_one_line_error_naming_key_and_file(tmp_path):
    path = write(tmp_path, "data_dir: /d\nepoch: 5\n")
    with pytest.raises(UserError) as err:
        parse_config(Example, ["--config", path])
    message = str(err.value)
    assert "unknown key 'epoch'" in message and path in message and "\n" not in message


@pytest.mark.parametrize("argv, fragment", [
    (["--data-dir", "D", "--epochs", "many"], "--epochs: expected int, got 'many'"),
    (["--data-dir", "D", "--mode", "medium"], "'medium' is not one of fast, slow"),
    (["--data-dir", "D", "--nope", "1"], "unrecognized arguments: --nope 1"),
    ([], "required: --data-dir"),
])
def test_bad_command_lines(argv, fragment):
    with pytest.raises(UserError) as err:
        parse_config(Example, argv)
    assert fragment in str(err.value)


def test_bad_yaml_value_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"key 'lr' in config file .*: expected float, got 'fast'"):
        parse_config(Example, ["--config", write(tmp_path, "data_dir: d\nlr: fast\n")])
    with pytest.raises(UserError, match="config file not found"):
        parse_config(Example, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(UserError, match="must hold a mapping"):
        parse_config(Example, ["--config", write(tmp_path, "- a\n- b\n")])


def test_from_dict_round_trip_and_rejects_unknown_keys():
    cfg = Example(data_dir="D", backbones=("a", "b"))
    assert from_dict(Example, to_dict(cfg)) == cfg
    with pytest.raises(UserError, match="unknown key 'lrr'"):
        from_dict(Example, {**to_dict(cfg), "lrr": 1})
    with pytest.raises(FrozenInstanceError):
        cfg.epochs = 1


@dataclass(frozen=True)
class Inner:
    temperature: float = option(0.1, help="softmax temperature")
    name: Literal["a", "b"] = option("a")


@dataclass(frozen=True)
class Outer:
    """A job with a nested config."""

    data_dir: str = option(help="where")
    inner: Inner = option(default_factory=Inner, help="the nested settings")


def test_a_nested_config_gets_prefixed_flags_and_a_yaml_mapping(tmp_path):
    assert parse_config(Outer, ["--data-dir", "D"]) == Outer(data_dir="D")
    cfg = parse_config(Outer, ["--data-dir", "D", "--inner-temperature", "0.5", "--inner-name", "b"])
    assert cfg.inner == Inner(temperature=0.5, name="b")
    path = write(tmp_path, "data_dir: /d\ninner:\n  temperature: 0.3\n")
    assert parse_config(Outer, ["--config", path]).inner == Inner(temperature=0.3)
    assert parse_config(Outer, ["--config", path, "--inner-name", "b"]).inner == Inner(temperature=0.3, name="b")
    assert parse_config(Outer, ["--config", path, "--inner-temperature", "0.9"]).inner.temperature == 0.9
    assert "--inner-temperature" in build_parser(Outer, "job").format_help()


def test_a_nested_config_round_trips_and_rejects_unknown_or_bad_keys(tmp_path):
    cfg = Outer(data_dir="D", inner=Inner(temperature=0.2, name="b"))
    assert to_dict(cfg) == {"data_dir": "D", "inner": {"temperature": 0.2, "name": "b"}}
    assert from_dict(Outer, to_dict(cfg)) == cfg
    with pytest.raises(UserError, match="unknown key 'temprature' in key 'inner' in config"):
        from_dict(Outer, {"data_dir": "D", "inner": {"temprature": 0.2}})
    with pytest.raises(UserError) as err:
        parse_config(Outer, ["--config", write(tmp_path, "data_dir: d\ninner: {temperature: 0.1, colour: red}\n")])
    assert "unknown key 'colour'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="--inner-temperature: expected float, got 'hot'"):
        parse_config(Outer, ["--data-dir", "D", "--inner-temperature", "hot"])
    with pytest.raises(UserError, match="key 'inner' in config: expected a mapping of temperature, name"):
        from_dict(Outer, {"data_dir": "D", "inner": 3})
