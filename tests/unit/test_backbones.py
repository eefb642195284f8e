"""Every registered backbone, taken from the registry's listing: adding one gets these tests for free."""

import pytest
import torch
import torchvision

from lib.backbones import BACKBONES, backbone_names, build_model, register_backbone
from lib.errors import UserError

NAMES = backbone_names()


def test_the_mission_backbones_are_registered():
    assert {"densenet121", "resnet50", "vgg16"} <= set(NAMES)
    assert sorted(BACKBONES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_backbone_embeds_to_unit_vectors(name):
    model = build_model(name, "none", embedding_dim=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_duplicate_names_are_refused(name):
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(name, imagenet=BACKBONES[name].imagenet)(lambda w: None)
    assert BACKBONES[name].name == name


def test_an_unknown_name_lists_every_registered_one():
    with pytest.raises(UserError) as err:
        build_model("no-such-net", "none")
    assert str(err.value) == f"unknown backbone(s) no-such-net (choose from {', '.join(NAMES)})"


@pytest.mark.parametrize("name", NAMES)
def test_weights_file_round_trip(tmp_path, name):
    model = build_model(name, "none", embedding_dim=8).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = build_model(name, str(tmp_path / "model.pt"), embedding_dim=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


@pytest.mark.parametrize("name", NAMES)
def test_torchvision_weights_file_loads_into_the_body(tmp_path, name):
    """A plain torchvision file of the same architecture (registered names are torchvision's) fills the body:
    its first layer's weights arrive unchanged."""
    reference = torchvision.models.get_model(name)
    torch.save(reference.state_dict(), tmp_path / f"{name}-torchvision.pth")
    model = build_model(name, str(tmp_path / f"{name}-torchvision.pth"))
    assert torch.equal(next(model.body.parameters()), next(reference.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_bad_weights_files(tmp_path, name):
    with pytest.raises(UserError, match="weights file not found"):
        build_model(name, str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        build_model(name, str(tmp_path / "junk.pt"))
    other = next(n for n in NAMES if n != name)
    torch.save(build_model(other, "none").state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match=f"does not fit {name}"):
        build_model(name, str(tmp_path / "other.pt"))


@pytest.mark.parametrize("name", NAMES)
def test_imagenet_weights_offline_names_the_alternatives(tmp_path, monkeypatch, name):
    # No network: an empty torch cache and a proxy that refuses connections, on any machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(UserError) as err:
        build_model(name, "imagenet")
    message = str(err.value)
    assert message.startswith(f"cannot load ImageNet weights for {name} (https://download.pytorch.org/")
    assert "--weights none" in message and "--weights PATH" in message and "\n" not in message


def test_crafted_weights_file_is_refused_without_running_it(tmp_path):
    """--weights PATH is loaded with weights_only: a pickle that would run code is a one-line error."""
    import os

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch '{tmp_path / 'ran'}'",)

    torch.save({"body.conv1.weight": RunsCode()}, tmp_path / "crafted.pt")
    with pytest.raises(UserError) as err:
        build_model(NAMES[0], str(tmp_path / "crafted.pt"))
    assert str(err.value).startswith(f"cannot read weights file {tmp_path / 'crafted.pt'}: it asks to run ")
    assert "system, which a state dict never does" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ran").exists()
