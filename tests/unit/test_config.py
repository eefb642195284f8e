from dataclasses import FrozenInstanceError, dataclass
from typing import Literal

import pytest

from lib.config import from_dict, option, parse_config, to_dict
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
