import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lib.data.images import decode_image_file
from lib.data.reader import PreparedData, read_manifest
from lib.data.writer import merge_summaries, parquet_schema, write_shard_batch
from lib.errors import UserError
from tests.conftest import image_array


def test_decode_rgb_png_is_exact(tmp_path):
    pixels = image_array("cat", 1)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    array, conversions = decode_image_file(str(tmp_path / "a.png"), (32, 32, 3))
    assert conversions == [] and np.array_equal(array, pixels)


def test_decode_converts_grey_rgba_and_size(tmp_path):
    Image.fromarray(np.full((32, 32), 100, np.uint8), mode="L").save(tmp_path / "grey.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:16, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((60, 40, 3), 7, np.uint8)).save(tmp_path / "big.png")

    grey, conv = decode_image_file(str(tmp_path / "grey.png"), (32, 32, 3))
    assert conv == ["mode L->RGB"] and grey.shape == (32, 32, 3) and (grey == 100).all()
    red, conv = decode_image_file(str(tmp_path / "rgba.png"), (32, 32, 3))
    assert conv == ["mode RGBA->RGB"]
    assert (red[0, 0] == [255, 0, 0]).all() and (red[-1, -1] == [255, 255, 255]).all()  # on white
    big, conv = decode_image_file(str(tmp_path / "big.png"), (32, 32, 3))
    assert conv == ["size 40x60->32x32"] and big.shape == (32, 32, 3) and (big == 7).all()


def test_decode_rejects_non_images(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(Exception, match="cannot identify image file"):
        decode_image_file(str(tmp_path / "notes.txt"), (32, 32, 3))


def test_write_shard_batch_schema_and_bad_files(tmp_path):
    paths = []
    for i in range(4):
        Image.fromarray(image_array("dog", i)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    paths.append(str(tmp_path / "broken.png"))
    batch = {"row": np.arange(10, 15), "id": np.array([f"id{i}" for i in range(5)], dtype=object),
             "label": np.array([1, 1, 0, 1, 0]), "split": np.array(["train", "val", "train", "train", "val"],
                                                                     dtype=object),
             "path": np.array(paths, dtype=object)}
    out = tmp_path / "out"
    summary = json.loads(write_shard_batch(batch, out_dir=str(out), image_shape=(32, 32, 3),
                                           classes=["cat", "dog"])["summary"][0])
    assert [w["file"] for w in summary["written"]] == ["train/part-0000010.parquet", "val/part-0000011.parquet"]
    assert summary["bad"][0][0].endswith("broken.png")
    table = pq.read_table(out / "train" / "part-0000010.parquet")
    assert table.schema.equals(parquet_schema((32, 32, 3)), check_metadata=False)
    assert table.column("id").to_pylist() == ["id0", "id2", "id3"]
    assert table.column("label_name").to_pylist() == ["dog", "cat", "dog"]
    images = table.column("image").combine_chunks().to_numpy_ndarray()
    assert np.array_equal(images[0], image_array("dog", 0))
    val = pq.read_table(out / "val" / "part-0000011.parquet")
    assert val.num_rows == 1  # the broken file is left out
    merged = merge_summaries([summary], ["cat", "dog"])
    assert merged["counts"]["train"] == {"cat": 1, "dog": 2} and merged["counts"]["val"] == {"cat": 0, "dog": 1}
    assert len(merged["bad"]) == 1


def test_incomplete_data_dir_has_no_manifest(tmp_path):
    assert PreparedData.find(tmp_path) is None
    with pytest.raises(UserError, match="not a prepared data set"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "files": {"train": ["train/part-0.parquet"], "val": [], "test": []}}))
    assert PreparedData.find(tmp_path) is None  # a listed file is missing


def test_a_deleted_parquet_file_is_named_not_reported_as_a_missing_manifest(tmp_path):
    from lib.data.reader import FORMAT_VERSION

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-0.parquet").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "files": {
        "train": ["train/part-0.parquet", "train/part-1.parquet"], "val": [], "test": []}}))
    with pytest.raises(UserError) as err:
        PreparedData.open(tmp_path)
    assert str(err.value).startswith(f"damaged prepared data: {tmp_path / 'train' / 'part-1.parquet'} is missing; "
                                     f"rerun jobs.prepare with the same flags")

