"""Backbone registry: torchvision bodies with an L2-normalised embedding head.

Adding a backbone is one registered function that returns the torchvision body (the network up
to its pooled features) and the feature width::

    @register_backbone("efficientnet_b0", imagenet=EfficientNet_B0_Weights.DEFAULT)
    def efficientnet_b0(weights):
        model = torchvision.models.efficientnet_b0(weights=weights)
        model.classifier = nn.Identity()
        return model, 1280

``--weights imagenet`` uses the registered torchvision weight enum (downloaded once into torch's
hub cache); ``none`` starts from random weights; a file path loads a saved state dict with
``torch.load(weights_only=True)`` — either this project's ``model.pt`` or plain torchvision weights.
"""

from __future__ import annotations

import pickle
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import DenseNet121_Weights, ResNet50_Weights, VGG16_Weights, WeightsEnum

from lib.checkpoints import refused_global, safe_torch_load
from lib.errors import UserError

BodyBuilder = Callable[[WeightsEnum | None], tuple[nn.Module, int]]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build_body: BodyBuilder
    imagenet: WeightsEnum


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, imagenet: WeightsEnum) -> Callable[[BodyBuilder], BodyBuilder]:
    """Register ``build_body(weights) -> (body, feature_dim)`` under ``name``; names are unique."""

    def decorate(build_body: BodyBuilder) -> BodyBuilder:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = BackboneSpec(name, build_body, imagenet)
        return build_body

    return decorate


@register_backbone("resnet50", imagenet=ResNet50_Weights.DEFAULT)
def resnet50(weights: WeightsEnum | None) -> tuple[nn.Module, int]:
    model = torchvision.models.resnet50(weights=weights)
    model.fc = nn.Identity()
    return model, 2048


@register_backbone("densenet121", imagenet=DenseNet121_Weights.DEFAULT)
def densenet121(weights: WeightsEnum | None) -> tuple[nn.Module, int]:
    model = torchvision.models.densenet121(weights=weights)
    model.classifier = nn.Identity()
    return model, 1024


@register_backbone("vgg16", imagenet=VGG16_Weights.DEFAULT)
def vgg16(weights: WeightsEnum | None) -> tuple[nn.Module, int]:
    # Only the convolutional part: torchvision's VGG16 would also build (and randomly initialise) its
    # 120M-parameter classifier, seconds of work for layers we drop. Global-average-pooling the 512
    # channels keeps the head small and independent of the input size.
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=False)
    if weights is None:
        for module in features.modules():
            if isinstance(module, nn.Conv2d):  # VGG's own initialisation (He, fan-out)
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
    else:
        state = weights.get_state_dict(progress=True, check_hash=True)
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                  if k.startswith("features.")})
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 512


class EmbeddingNet(nn.Module):
    """``body`` -> linear head -> batch norm -> L2 normalisation: (N, 3, S, S) float -> (N, D) unit vectors.

    The batch norm before the normalisation (a "BN neck") keeps every embedding dimension centred
    and of unit scale. Without it a from-scratch network trained with a triplet loss drifts towards
    one shared direction: measured here (ResNet50, 32 px, 5,000 CIFAR images, 3 epochs) the mean
    pairwise distance fell to ~0.3 and val P@5 barely moved; with it the spread stayed ~1.3 and
    P@5 rose by 5.5 points.
    """

    def __init__(self, body: nn.Module, feature_dim: int, embedding_dim: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, embedding_dim)
        self.neck = nn.BatchNorm1d(embedding_dim)
        self.embedding_dim = embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(self.head(self.body(images)).float()), dim=1)


def backbone_names() -> list[str]:
    return sorted(BACKBONES)


def check_backbones(names: tuple[str, ...] | list[str]) -> None:
    """Raise :class:`UserError` for names that are not registered."""
    unknown = [name for name in names if name not in BACKBONES]
    if unknown:
        raise UserError(f"unknown backbone(s) {', '.join(unknown)} (choose from {', '.join(backbone_names())})")
    if not names:
        raise UserError("no backbone given")


def fetch_imagenet_weights(name: str) -> None:
    """Make sure ``name``'s ImageNet weights are in torch's hub cache (download once, hash-checked).

    Jobs call this in the driver, so an offline machine fails in a second with one line instead of
    inside every training worker.
    """
    check_backbones([name])
    enum = BACKBONES[name].imagenet
    try:
        enum.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        reason = getattr(err, "reason", None) or str(err).splitlines()[0]
        raise UserError(f"cannot load ImageNet weights for {name} ({enum.url}: {reason}); "
                        f"use --weights none to start from random weights, or --weights PATH "
                        f"with the downloaded file") from None


def build_model(name: str, weights: str = "none", embedding_dim: int = 128) -> EmbeddingNet:
    """Build backbone ``name`` with ``weights`` = ``imagenet`` | ``none`` | a state-dict file path."""
    check_backbones([name])
    spec = BACKBONES[name]
    if weights == "imagenet":
        fetch_imagenet_weights(name)
        body, feature_dim = spec.build_body(spec.imagenet)  # from the cache now
        return EmbeddingNet(body, feature_dim, embedding_dim)
    body, feature_dim = spec.build_body(None)
    model = EmbeddingNet(body, feature_dim, embedding_dim)
    if weights != "none":
        load_weights(model, Path(weights), name)
    return model


def load_weights(model: EmbeddingNet, path: Path, name: str) -> None:
    """Load ``path`` into ``model``: a whole EmbeddingNet state dict, or torchvision weights for the body.

    A torchvision file's classifier (``fc.*``/``classifier.*``) is ignored; anything else that does
    not fit raises :class:`UserError`.
    """
    if not path.is_file():
        raise UserError(f"weights file not found: {path} (use --weights imagenet, none or a file path)")
    try:
        state = safe_torch_load(path, map_location="cpu")  # weights_only: a weights file never runs code
    except pickle.UnpicklingError as err:
        refused = refused_global(err)
        reason = (f"it asks to run {refused}, which a state dict never does" if refused
                  else "not a plain PyTorch state dict (weights_only loading refused it)")
        raise UserError(f"cannot read weights file {path}: {reason}") from None
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a state dict we can read
        raise UserError(f"cannot read weights file {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"weights file does not hold a state dict: {path}")
    if any(key.startswith("body.") for key in state):
        target, state_to_load = model, state
    else:
        target = model.body
        state_to_load = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
        if name == "vgg16":  # torchvision's VGG keys are features.N.*; our body is Sequential(features, ...)
            state_to_load = {k.replace("features.", "0.", 1): v for k, v in state_to_load.items()}
    try:
        target.load_state_dict(state_to_load, strict=True)
    except RuntimeError as err:
        first = str(err).split("\n\t", 2)[1] if "\n\t" in str(err) else str(err)
        raise UserError(f"weights file {path} does not fit {name}: {first.strip()[:300]}") from None
