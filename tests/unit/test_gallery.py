"""The run gallery's checks without Ray: uploads refused before decoding, and only RUN/eval's pictures served."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from lib.errors import UserError
from lib.gallery import UnknownImage, UploadTooLarge, check_upload, figure_path
from lib.paths import RunPaths


def png_bytes(width: int = 4, height: int = 3) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says ``width`` x ``height`` (a decompression bomb's header, with a valid CRC)."""
    data = bytearray(png_bytes(1, 1))
    start = data.index(b"IHDR")
    header = struct.pack(">II", width, height) + bytes(data[start + 12:start + 17])
    data[start + 4:start + 17] = header
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def test_a_small_image_passes():
    check_upload(png_bytes(), max_bytes=10_000, max_pixels=100)


@pytest.mark.parametrize("data, error, message", [
    (b"", UserError, "the uploaded file is empty"),
    (b"GIF89a but not really", UserError, "the upload is not an image"),
    (b"%PDF-1.7\n" * 10, UserError, "the upload is not an image (UnidentifiedImageError)"),
    (png_bytes() + b"\0" * 20_000, UploadTooLarge, "more than the limit of 10000"),
    (png_claiming(300, 200), UploadTooLarge, "300x200 pixels, more than the limit of 100"),
    (png_claiming(20_000, 20_000), UploadTooLarge, "too large to decode"),  # PIL itself refuses to open it
], ids=["empty", "gif-magic", "pdf", "bytes", "pixels", "bomb"])
def test_bad_uploads_are_refused_with_one_line(data, error, message):
    with pytest.raises(error) as raised:
        check_upload(data, max_bytes=10_000, max_pixels=100)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_too_large_is_a_user_error_and_its_own_kind():
    assert issubclass(UploadTooLarge, UserError) and issubclass(UnknownImage, UserError)
    assert not issubclass(UploadTooLarge, UnknownImage)


def test_only_eval_pictures_are_served(tmp_path):
    run = RunPaths.of(tmp_path)
    run.eval.mkdir()
    for name in ("tsne.png", "loss_curve_resnet50.png", "index.faiss", "results.md"):
        (run.eval / name).write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    assert figure_path(run, "tsne.png") == run.eval / "tsne.png"
    assert figure_path(run, "loss_curve_resnet50.png").is_file()
    for name in ("index.faiss", "results.md", "../secret.png", "clusters.png", "loss_curve_a/../../secret.png"):
        with pytest.raises(UnknownImage, match="no figure"):
            figure_path(run, name)
