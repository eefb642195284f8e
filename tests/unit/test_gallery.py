"""The run gallery's checks without Ray: uploads refused before decoding, only RUN/eval's pictures served, and the
embedding map read back as written and refused when it is not its layout."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lib.errors import UserError
from lib.gallery import NoMap, UnknownImage, UploadTooLarge, check_upload, figure_path, read_tsne_map
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


def write_map(run: RunPaths, **changes) -> dict:
    from lib.report import tsne_map_document, write_tsne_map

    document = tsne_map_document("resnet50", ["cat", "dog"], np.array(["test/cat/0", "test/dog/1", "test/dog/2"]),
                                 np.array([0, 1, 1]), np.array([1, 0, 0]),
                                 np.array([[0.12345, -3.0], [10.5, 2.25], [-1.0, 0.0]], np.float32))
    document.update(changes)
    run.eval.mkdir(exist_ok=True)
    write_tsne_map(run.eval / "map.json", document)
    return document


def test_the_map_is_read_back_as_written(tmp_path):
    run = RunPaths.of(tmp_path)
    written = write_map(run)
    assert written == {"model": "resnet50", "classes": ["cat", "dog"], "clusters": 2,
                       "id": ["test/cat/0", "test/dog/1", "test/dog/2"], "x": [0.123, 10.5, -1.0],
                       "y": [-3.0, 2.25, 0.0], "label": [0, 1, 1], "cluster": [1, 0, 0]}
    assert read_tsne_map(run) == written
    assert "\n" not in (run.eval / "map.json").read_text()  # one line: no indentation bytes on 10k points


@pytest.mark.parametrize("changes, message", [
    ({"x": [0.0, 1.0]}, "must be lists of one length"),
    ({"label": [0, 2, 1]}, "label[1] = '2' is not a class index below 2"),
    ({"cluster": [0, 0, 5]}, "cluster[2] = '5' is not a cluster below 2"),
    ({"y": [0.0, float("nan"), 1.0]}, "y[1] = 'nan' is not a finite number"),
    ({"x": [0.0, "1", 1.0]}, "x[1] = '1' is not a finite number"),
    ({"id": ["a", 3, "c"]}, "id[1] = '3' is not a string"),
    ({"label": [0, True, 1]}, "label[1] = 'True' is not a class index"),
    ({"classes": "cat"}, "classes must be a list of names"),
    ({"extra": 1}, "expected the keys model, classes"),
], ids=["lengths", "label", "cluster", "nan", "string-x", "int-id", "bool-label", "classes", "extra-key"])
def test_a_map_that_is_not_the_layout_is_refused_with_one_line(tmp_path, changes, message):
    run = RunPaths.of(tmp_path)
    write_map(run, **changes)
    with pytest.raises(NoMap) as raised:
        read_tsne_map(run)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_missing_or_broken_map_is_a_404_kind(tmp_path):
    run = RunPaths.of(tmp_path)
    with pytest.raises(NoMap, match="no map.json in"):
        read_tsne_map(run)
    run.eval.mkdir()
    (run.eval / "map.json").write_text("{not json")
    with pytest.raises(NoMap, match="not readable JSON"):
        read_tsne_map(run)
    assert issubclass(NoMap, UnknownImage)
