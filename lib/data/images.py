"""Image files -> RGB uint8 arrays of one shape, the way jobs.prepare stores them (and jobs.serve decodes queries)."""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import pyarrow.fs as pafs


def decode_image_file(path: str | BinaryIO, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Decode one file (a path or an open binary file) to an RGB uint8 array of ``shape`` (H, W, 3).

    Returns the array and the conversions applied (e.g. ``"mode L->RGB"``, ``"size 40x30->32x32"``).
    Images with transparency are composited on white; other sizes are scaled to cover the target
    and centre-cropped (aspect ratio kept). Raises whatever PIL raises for a non-image or corrupt file.
    """
    from PIL import Image, ImageOps

    height, width = shape[:2]
    conversions = []
    with Image.open(path) as image:
        if image.size != (width, height) and image.format == "JPEG":
            # Let the JPEG decoder downscale by a power of two first: far cheaper for large photos.
            image.draft("RGB", (width, height))
        image.load()
        if image.mode != "RGB":
            mode = image.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                image = image.convert("RGB")
            conversions.append(f"mode {mode}->RGB")
        if image.size != (width, height):
            conversions.append(f"size {image.size[0]}x{image.size[1]}->{width}x{height}")
            image = ImageOps.fit(image, (width, height), method=Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    return array, conversions


def fit_image_array(image: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """An RGB uint8 array (h, w, 3) at ``shape`` (H, W, 3): scaled to cover and centre-cropped, the way
    :func:`decode_image_file` resizes files (for sources whose pixels are already in memory)."""
    from PIL import Image, ImageOps

    height, width = shape[:2]
    if image.shape[:2] == (height, width):
        return image
    fitted = ImageOps.fit(Image.fromarray(image), (width, height), method=Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8)


class _FileBytes(io.BytesIO):
    """A file's bytes in memory that PIL names by the file's path in its errors (it prints ``repr(fp)``)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def read_image_file(filesystem: pafs.FileSystem, path: str, shape: tuple[int, int, int],
                    name: str | None = None) -> tuple[np.ndarray, list[str]]:
    """:func:`decode_image_file` of ``path`` on ``filesystem`` (local disk, object storage, ...).

    The file is read whole in one request (one GET on object storage) and decoded from memory; errors name
    ``name`` (default ``path``). Raises what the filesystem raises for an unreadable file, else what PIL raises.
    """
    with filesystem.open_input_file(path) as handle:
        data = handle.read()
    return decode_image_file(_FileBytes(data, name or path), shape)
