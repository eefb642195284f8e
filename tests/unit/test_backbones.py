import pytest
import torch
import torchvision

from lib.backbones import BACKBONES, build_model, register_backbone
from lib.errors import UserError


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_embeds_to_unit_vectors(name):
    model = build_model(name, "none", embedding_dim=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_duplicate_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet50", imagenet=BACKBONES["resnet50"].imagenet)(lambda w: None)
    with pytest.raises(UserError, match="unknown backbone.*efficientnet.*choose from densenet121, resnet50, vgg16"):
        build_model("efficientnet", "none")


def test_weights_file_round_trip(tmp_path):
    model = build_model("vgg16", "none", embedding_dim=8).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = build_model("vgg16", str(tmp_path / "model.pt"), embedding_dim=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


def test_torchvision_weights_file_loads_into_the_body(tmp_path):
    reference = torchvision.models.vgg16()
    torch.save(reference.state_dict(), tmp_path / "vgg16-torchvision.pth")
    model = build_model("vgg16", str(tmp_path / "vgg16-torchvision.pth"))
    assert torch.equal(model.body[0][0].weight, reference.features[0].weight)


def test_bad_weights_files(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        build_model("resnet50", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        build_model("resnet50", str(tmp_path / "junk.pt"))
    torch.save(build_model("vgg16", "none").state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(UserError, match="does not fit resnet50"):
        build_model("resnet50", str(tmp_path / "vgg.pt"))


def test_imagenet_weights_offline_names_the_alternatives(tmp_path, monkeypatch):
    # No network: an empty torch cache and a proxy that refuses connections, on any machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(UserError) as err:
        build_model("resnet50", "imagenet")
    message = str(err.value)
    assert message.startswith("cannot load ImageNet weights for resnet50 (https://download.pytorch.org/")
    assert "--weights none" in message and "--weights PATH" in message and "\n" not in message


def test_crafted_weights_file_is_refused_without_running_it(tmp_path):
    """--weights PATH is loaded with weights_only: a pickle that would run code is a one-line error."""
    import os

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch '{tmp_path / 'ran'}'",)

    torch.save({"body.conv1.weight": RunsCode()}, tmp_path / "crafted.pt")
    with pytest.raises(UserError) as err:
        build_model("resnet50", str(tmp_path / "crafted.pt"))
    assert str(err.value).startswith(f"cannot read weights file {tmp_path / 'crafted.pt'}: it asks to run ")
    assert "system, which a state dict never does" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ran").exists()
