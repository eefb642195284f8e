"""Batched image augmentation and normalisation, in PyTorch.

One random affine warp per image does the whole geometric augmentation in a single
``grid_sample`` over the batch: random resized crop (zoom), shift, rotation (up to 20 degrees),
horizontal flip and, when ``image_size`` differs from the stored size, the resize. It runs the same
inside a Ray Data ``map_batches`` task, a PyTorch ``DataLoader`` worker, or on the training device (a Ray
Train worker's GPU or CPU, on tensors already there: ``jobs.train --augment-on device``, the default).

Inputs are stored images, (N, H, W, 3) uint8; outputs are (N, 3, S, S) uint8, and the consumer
applies :func:`normalize` on its device, so pipelines move a quarter of the bytes of float32.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics: the pretrained torchvision backbones expect inputs normalised by them,
# and networks trained from scratch are indifferent to the choice.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images warped per step: at 32 px, 128 images keep the working set in cache (measured here:
# 3.2 ms per 128 images in one go, 7.2 ms per 128 when warping 1,024 at once).
CHUNK = 128


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random warp. ``image_size=None`` keeps the stored size.

    ``max_shift`` is a fraction of the image side (0.125 = 4 px at 32 px, the classic CIFAR crop);
    ``min_zoom`` is the smallest side fraction of a random resized crop (0.8 = 64 % of the area).
    """

    image_size: int | None = None
    max_shift: float = 0.125
    max_rotation_degrees: float = 20.0
    min_zoom: float = 0.8
    horizontal_flip: bool = True

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if not 0.0 < self.min_zoom <= 1.0:
            raise ValueError(f"min_zoom must be in (0, 1], got {self.min_zoom}")


def fresh_generator(seed: int | None = None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``seed`` or, when None, from the OS.

    Forked and spawned workers would otherwise share torch's fixed default seed and draw the same
    "random" augmentations. A generator on the images' device draws the warp parameters there, so
    augmenting on a GPU needs no host round trip.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


def as_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor view of ``images`` without copying; read-only arrays (Ray's zero-copy batches) are fine
    because every transform here writes to new memory."""
    if isinstance(images, torch.Tensor):
        return images
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(np.asarray(images))


def to_float_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    images = as_tensor(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] -> uint8, rounded: what the pipelines hand over (4x fewer bytes)."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 from a pipeline -> float32 normalised with the ImageNet statistics.

    Consumers call this after moving a batch to its device, so only uint8 crosses process and
    host-to-device boundaries (the pattern of GPU-side normalisation in DALI and FFCV).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    mean, inverse_std = normalization_constants(images.device, images.dtype == torch.uint8)
    return (images.float() - mean) * inverse_std


# (device, uint8 input) -> (mean, 1 / std) as (1, 3, 1, 1) float32 tensors on that device
_CONSTANTS: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor]] = {}


def normalization_constants(device: torch.device, uint8_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and reciprocal std, scaled for uint8 input when asked, made once per device: building
    them from Python numbers on every call would copy them host-to-device (a blocking wait) every step."""
    key = (torch.device(device), uint8_input)
    if key not in _CONSTANTS:
        scale = 255.0 if uint8_input else 1.0
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * scale
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * scale
        _CONSTANTS[key] = (mean.to(key[0]), (1.0 / std).to(key[0]))
    return _CONSTANTS[key]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    # antialias only matters (and only costs) when shrinking
    shrink = size < max(images.shape[-2:])
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


# Images resized per step by resize_batch: the float32 working copy of a chunk at 224 px is 512 x 0.6 MB = 308 MB,
# where resizing a 5,000-image val split in one go would hold about 6.8 GB.
RESIZE_CHUNK = 512


def resize_batch(images: torch.Tensor | np.ndarray, image_size: int | None = None,
                 chunk: int = RESIZE_CHUNK) -> torch.Tensor:
    """Evaluation transform: (N, H, W, 3) uint8 -> (N, 3, S, S) uint8, resized when ``image_size`` is set,
    on the images' device, ``chunk`` images at a time (only the uint8 result is held whole)."""
    images = as_tensor(images)
    if image_size is None or tuple(images.shape[1:3]) == (image_size, image_size):
        return images.permute(0, 3, 1, 2).contiguous()
    out = torch.empty((len(images), 3, image_size, image_size), dtype=torch.uint8, device=images.device)
    for start in range(0, len(images), max(1, chunk)):
        out[start:start + chunk] = to_uint8(_resize(to_float_nchw(images[start:start + chunk]), image_size))
    return out


def random_affine_params(n: int, settings: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """(N, 2, 3) affine matrices in ``affine_grid``'s normalised coordinates (output -> input), on the
    generator's device."""
    device = generator.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    zoom = uniform(settings.min_zoom, 1.0)  # < 1 samples a smaller window: a zoomed-in crop
    angle = uniform(-1.0, 1.0) * math.radians(settings.max_rotation_degrees)
    # Coordinates span [-1, 1], so a shift of a fraction f of the side is 2f in these units.
    shift_x = uniform(-1.0, 1.0) * 2 * settings.max_shift
    shift_y = uniform(-1.0, 1.0) * 2 * settings.max_shift
    flip = torch.ones(n, device=device)
    if settings.horizontal_flip:
        flip = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.empty(n, 2, 3, device=device)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 0, 2] = shift_x
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, 1, 2] = shift_y
    return theta


def augment_batch(images: torch.Tensor | np.ndarray, settings: AugmentSettings = AugmentSettings(),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Training transform: (N, H, W, 3) uint8 -> randomly warped (N, 3, S, S) uint8; see :func:`normalize`.

    Every call draws new parameters (a fresh OS-seeded generator unless one is given), so each
    epoch sees new views. Pixels warped in from outside the image are filled by reflection.
    Runs on the images' device; ``generator`` must live there too (see :func:`fresh_generator`).
    Large inputs on the CPU (a whole Ray Data block) are warped in chunks that stay in its cache; on a
    GPU the batch is warped in one go.
    """
    images = as_tensor(images)
    generator = generator or fresh_generator(device=images.device)
    size = settings.image_size or images.shape[2]
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images.device)
    chunk = CHUNK if images.device.type == "cpu" else max(1, len(images))
    for start in range(0, len(images), chunk):
        batch = to_float_nchw(images[start:start + chunk])
        if size < max(batch.shape[-2:]):
            batch = _resize(batch, size)  # shrink with antialiasing first; the warp then samples 1:1
        theta = random_affine_params(len(batch), settings, generator)
        grid = F.affine_grid(theta, [len(batch), 3, size, size], align_corners=False)
        warped = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out[start:start + chunk] = to_uint8(warped)
    return out
