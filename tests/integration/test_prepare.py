"""jobs.prepare through the real Ray Data path on tiny generated data."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import prepare
from lib.data.reader import SPLITS, PreparedData, read_manifest
from tests.conftest import CLASSES, image_array

pytestmark = pytest.mark.usefixtures("ray_session")


def run(capsys, *argv):
    code = prepare.cli(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.strip().splitlines() if not line.startswith("[")], err


def test_prepares_image_folder(image_folder, tmp_path, capsys):
    data = tmp_path / "data"
    code, errors, _ = run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data))
    assert code == 0 and errors == []
    manifest = read_manifest(data)
    assert manifest["classes"] == list(CLASSES)
    assert manifest["counts"] == {"train": {c: 9 for c in CLASSES}, "val": {c: 1 for c in CLASSES},
                                  "test": {c: 4 for c in CLASSES}}
    assert manifest["skipped"] == [] and manifest["converted"]["to_rgb"] == 0
    ids = {split: list(PreparedData.open(data).read_split(split).ids) for split in SPLITS}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values())) == 3 * 14
    assert all(i.startswith("test/") for i in ids["test"]) and all(i.startswith("train/") for i in ids["val"])
    # pixels survive exactly (PNG source), label and label_name agree with the folder
    table = pq.read_table(data / manifest["files"]["train"][0])
    row = table.slice(0, 1).to_pylist()[0]
    split, name, file = row["id"].split("/")
    image = table.column("image").combine_chunks().to_numpy_ndarray()[0]
    assert np.array_equal(image, np.asarray(Image.open(image_folder / split / name / file)))
    assert row["label_name"] == name and CLASSES[row["label"]] == name


def test_rerun_is_a_no_op_and_other_settings_are_refused(image_folder, tmp_path, capsys):
    data = tmp_path / "data"
    assert run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data))[0] == 0
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    code, _, err = run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data))
    assert code == 0 and "nothing to do" in err
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before
    code, errors, _ = run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data),
                          "--seed", "1")
    assert code == 2 and len(errors) == 1 and "seed=0 (asked 1)" in errors[0] and str(data) in errors[0]
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == before


def test_partial_data_dir_is_prepared_again(image_folder, tmp_path, capsys):
    data = tmp_path / "data"
    assert run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data))[0] == 0
    manifest = read_manifest(data)
    # a crash after some splits moved into place: one split's file is gone, plus a stale staging folder
    (data / manifest["files"]["test"][0]).unlink()
    (data / ".prepare.x.tmp").mkdir()
    code, _, err = run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data))
    assert code == 0 and "nothing to do" not in err
    assert read_manifest(data)["counts"] == manifest["counts"]
    assert not (data / ".prepare.x.tmp").exists()


def test_foreign_files_in_data_dir_are_not_touched(image_folder, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "notes.txt").write_text("mine")
    code, errors, _ = run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data))
    assert code == 2 and "did not write" in errors[0] and str(data / "train") in errors[0]
    assert (data / "train" / "notes.txt").read_text() == "mine"


@pytest.fixture
def folder_with_bad_file(image_folder):
    bad = image_folder / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (image_folder / "test" / "cat" / "readme.txt").write_text("not an image")
    return image_folder, bad


def test_corrupt_file_fails_and_writes_nothing(folder_with_bad_file, tmp_path, capsys):
    folder, bad = folder_with_bad_file
    data = tmp_path / "data"
    code, errors, _ = run(capsys, "--source", f"imagefolder:{folder}", "--data-dir", str(data))
    assert code == 2 and len(errors) == 1
    assert "cannot read image" in errors[0] and "and 1 more" in errors[0] and "--skip-bad-images" in errors[0]
    assert str(bad) in errors[0] or str(folder / "test" / "cat" / "readme.txt") in errors[0]
    assert not data.exists() or sorted(os.listdir(data)) == []


def test_skip_bad_images_counts_and_lists_them(folder_with_bad_file, tmp_path, capsys):
    folder, bad = folder_with_bad_file
    data = tmp_path / "data"
    code, errors, _ = run(capsys, "--source", f"imagefolder:{folder}", "--data-dir", str(data),
                          "--skip-bad-images")
    assert code == 0 and errors == []
    manifest = read_manifest(data)
    assert sorted(s["path"] for s in manifest["skipped"]) == sorted(
        [str(bad), str(folder / "test" / "cat" / "readme.txt")])
    assert sum(manifest["totals"].values()) == 3 * 14  # the 42 real images, the 2 bad files left out


def test_skip_bad_images_draws_the_splits_among_the_readable_files(image_folder, tmp_path, capsys):
    """The one val pick of a class is the unreadable file: another cat image takes its place."""
    from lib.prepare import PrepareConfig, assign_splits

    data = tmp_path / "data"
    cfg = PrepareConfig(source=f"imagefolder:{image_folder}", data_dir=str(data), skip_bad_images=True)
    listing = cfg.data_source.list_images(cfg.list_options)
    splits = assign_splits(listing, cfg.val_fraction, cfg.seed)
    [pick] = [path for path, split, label in zip(listing.files, splits, listing.labels, strict=True)
              if split == "val" and listing.classes[label] == "cat"]
    Path(pick).write_bytes(b"\x89PNG cut short")
    code, errors, _ = run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data),
                          "--skip-bad-images")
    assert code == 0 and errors == []
    manifest = read_manifest(data)
    assert [s["path"] for s in manifest["skipped"]] == [pick]
    assert manifest["counts"]["val"]["cat"] == 1 and manifest["counts"]["train"]["cat"] == 8
    val = PreparedData.open(data).read_split("val")
    assert f"train/cat/{Path(pick).name}" not in set(val.ids) and len(val.ids) == len(set(val.ids))


def test_grey_rgba_and_odd_sizes_are_converted_and_recorded(image_folder, tmp_path, capsys):
    Image.fromarray(np.full((32, 32), 90, np.uint8), mode="L").save(image_folder / "train" / "cat" / "grey.png")
    rgba = np.dstack([image_array("dog", 3), np.full((32, 32), 255, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(image_folder / "train" / "dog" / "alpha.png")
    Image.fromarray(image_array("frog", 5, size=(64, 48))).save(image_folder / "test" / "frog" / "big.png")
    data = tmp_path / "data"
    assert run(capsys, "--source", f"imagefolder:{image_folder}", "--data-dir", str(data))[0] == 0
    manifest = read_manifest(data)
    assert manifest["image_shape"] == [32, 32, 3]
    assert manifest["converted"]["to_rgb"] == 2 and manifest["converted"]["resized"] == 1
    assert any("big.png (size 64x48->32x32)" in e for e in manifest["converted"]["examples"])
    test = PreparedData.open(data).read_split("test")
    big = test.images[list(test.ids).index("test/frog/big.png")]
    assert big.shape == (32, 32, 3)


def test_prepares_cifar_batches_at_a_chosen_size(cifar_batches, tmp_path, capsys):
    data = tmp_path / "data"
    code, errors, _ = run(capsys, "--source", f"cifar10:{cifar_batches}", "--data-dir", str(data),
                          "--image-size", "16")
    assert code == 0 and errors == []
    manifest = read_manifest(data)
    assert manifest["totals"] == {"train": 90, "val": 10, "test": 20}
    assert all(n == 1 for n in manifest["counts"]["val"].values())
    assert manifest["source_notes"]["verified"] is False
    assert manifest["image_size"] == 16 and manifest["image_shape"] == [16, 16, 3]
    assert manifest["converted"]["resized"] == 120
    from lib.data.images import fit_image_array
    from lib.sources.cifar10 import load_cifar10_batches

    listing = load_cifar10_batches(cifar_batches)
    test = PreparedData.open(data).read_split("test")
    by_id = dict(zip(listing.ids, listing.images, strict=True))
    assert all(np.array_equal(fit_image_array(by_id[i], (16, 16, 3)), image)
               for i, image in zip(test.ids, test.images, strict=True))
    json.dumps(manifest)  # the manifest is plain JSON
