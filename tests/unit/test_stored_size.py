"""jobs.prepare's stored image size (--image-size, --max-side) and the listing's map_each / credentials logic,
without Ray: pure functions and the decode task run in this process."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lib.data.images import fit_image_array
from lib.data.writer import write_shard_batch
from lib.errors import UserError
from lib.prepare import PrepareConfig, identity, stored_shape, with_stored_shape
from lib.sources import ListOptions, parse_location, parse_source
from lib.sources.imagefolder import list_image_folder
from lib.sources.location import credentials_hint
from tests.conftest import CLASSES, image_array, make_image_folder


def config(tmp_path, **settings) -> PrepareConfig:
    return PrepareConfig(source=f"imagefolder:{tmp_path}", data_dir=str(tmp_path / "d"), **settings)


def test_the_stored_shape_follows_image_size_or_max_side(tmp_path):
    photos = (3000, 4000, 3)  # 4000 x 3000 landscape photos: H=3000, W=4000
    assert stored_shape(config(tmp_path), photos) == photos
    assert stored_shape(config(tmp_path, image_size=224), photos) == (224, 224, 3)
    assert stored_shape(config(tmp_path, max_side=512), photos) == (384, 512, 3)  # 4:3 kept
    assert stored_shape(config(tmp_path, max_side=512), (4000, 3000, 3)) == (512, 384, 3)
    assert stored_shape(config(tmp_path, max_side=512), (32, 32, 3)) == (32, 32, 3)  # never enlarged
    assert stored_shape(config(tmp_path, max_side=2), (3, 1000, 3)) == (1, 2, 3)  # a side never reaches 0
    # both are identity settings: a DATA prepared at one size is not reused for another
    assert identity(config(tmp_path, max_side=512))["max_side"] == 512
    assert identity(config(tmp_path, image_size=64))["image_size"] == 64


@pytest.mark.parametrize("settings, fragment", [
    ({"image_size": 0}, "--image-size must be positive"),
    ({"max_side": -3}, "--max-side must be positive"),
    ({"image_size": 5000}, "--image-size must be at most 4096"),
    ({"image_size": 64, "max_side": 64}, "give --image-size or --max-side, not both"),
])
def test_bad_sizes_are_one_line(tmp_path, settings, fragment):
    with pytest.raises(UserError, match=fragment):
        config(tmp_path, **settings)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def test_files_are_decoded_at_the_chosen_size_and_the_listing_records_what_was_measured(tmp_path):
    # a folder of 64 x 48 images (W x H) stored with --max-side 32: 32 x 24, aspect kept, no crop
    folder = tmp_path / "src"
    for split, count in (("train", 3), ("test", 1)):
        for name in CLASSES[:2]:
            for i in range(count):
                _png(folder / split / name / f"{i}.png", image_array(name, i, size=(64, 48)))
    cfg = PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(tmp_path / "d"), max_side=32)
    listing = with_stored_shape(cfg, cfg.data_source.list_images(cfg.list_options))
    assert listing.image_shape == (24, 32, 3) and listing.notes["most_common_shape"] == [48, 64, 3]
    batch = {"row": np.arange(len(listing)), "id": np.array(listing.ids, dtype=object), "label": listing.labels,
             "split": listing.source_split, "path": np.array(listing.files, dtype=object)}
    summary = json.loads(write_shard_batch(batch, out_dir=str(tmp_path / "out"), image_shape=listing.image_shape,
                                           classes=listing.classes)["summary"][0])
    assert summary["bad"] == [] and summary["converted"] == {"size": len(listing)}
    table = pq.read_table(tmp_path / "out" / summary["written"][0]["file"])
    images = table.column("image").combine_chunks().to_numpy_ndarray()
    assert images.shape[1:] == (24, 32, 3)
    first = table.column("id").to_pylist()[0]
    expected = np.asarray(Image.open(folder / first).resize((32, 24), Image.Resampling.BICUBIC))
    assert np.abs(images[0].astype(int) - expected).max() <= 2  # the same picture, only smaller


def test_pixels_in_memory_are_fitted_like_files(tmp_path):
    square = image_array("dog", 1, size=(32, 32))
    batch = {"row": np.arange(2), "id": np.array(["train/0", "test/1"], dtype=object),
             "label": np.array([0, 1]), "split": np.array(["train", "test"], dtype=object),
             "image": np.stack([square, square])}
    summary = json.loads(write_shard_batch(batch, out_dir=str(tmp_path), image_shape=(16, 16, 3),
                                           classes=["a", "b"])["summary"][0])
    assert summary["converted"] == {"size": 2}
    stored = pq.read_table(tmp_path / "train" / "part-0000000.parquet").column("image").combine_chunks()
    assert np.array_equal(stored.to_numpy_ndarray()[0], fit_image_array(square, (16, 16, 3)))
    assert fit_image_array(square, (32, 32, 3)) is square


def test_a_chosen_size_reads_no_header(tmp_path):
    # files that do not open as images: measuring their size fails, a chosen size never opens them
    for split in ("train", "test"):
        for name in CLASSES[:2]:
            (tmp_path / "src" / split / name).mkdir(parents=True)
            (tmp_path / "src" / split / name / "0.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="none of 4 sampled files could be opened as an image"):
        list_image_folder(tmp_path / "src")
    assert list_image_folder(tmp_path / "src", image_shape=(8, 8, 3)).image_shape == (8, 8, 3)


def test_class_folders_and_headers_go_through_map_each(tmp_path):
    root = make_image_folder(tmp_path / "images", train_per_class=2, test_per_class=1)
    mapped = []

    def recording_map(function, items):
        mapped.append(items)
        # what jobs.prepare's Ray Data tasks do: the function pickled, items and results through JSON
        function = pickle.loads(pickle.dumps(function))
        return [json.loads(json.dumps(function(json.loads(json.dumps(item))))) for item in items]

    filesystem = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    through_tasks = list_image_folder("", filesystem=filesystem, map_each=recording_map)
    folders, header_chunks = mapped
    assert folders == [f"{split}/{name}" for split in ("train", "test") for name in CLASSES]
    assert sum(map(len, header_chunks)) == 3 * 3  # every file's header: fewer than the sample of 512
    in_process = list_image_folder("", filesystem=filesystem)
    assert through_tasks.ids == in_process.ids and through_tasks.files == in_process.files
    assert through_tasks.image_shape == in_process.image_shape == (32, 32, 3)
    # the source hands a URI's listing to the options' map_each, and walks a local path in this process
    mapped.clear()
    parse_source(f"imagefolder:{root}").list_images(ListOptions(cache_dir=tmp_path, map_each=recording_map))
    assert mapped == []
    as_uri = parse_source(f"imagefolder:file://{root}").list_images(ListOptions(cache_dir=tmp_path,
                                                                                 map_each=recording_map))
    assert len(mapped) == 2 and as_uri.ids == in_process.ids


def test_a_scheme_only_fsspec_knows_lists_and_decodes_through_it(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    local = make_image_folder(tmp_path / "images", train_per_class=2, test_per_class=1)
    memory = fsspec.filesystem("memory")
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        memory.pipe(f"/stored-size-test/{file.relative_to(local).as_posix()}", file.read_bytes())
    memory.pipe("/stored-size-test/train/cat/9.png", b"not an image")
    try:
        listing = parse_source("imagefolder:memory://stored-size-test").list_images(ListOptions(cache_dir=tmp_path))
        assert listing.ids == [*list_image_folder(local).ids[:2], "train/cat/9.png", *list_image_folder(local).ids[2:]]
        batch = {"row": np.arange(len(listing)), "id": np.array(listing.ids, dtype=object),
                 "label": listing.labels, "split": listing.source_split, "path": np.array(listing.files, dtype=object)}
        summary = json.loads(write_shard_batch(batch, out_dir=str(tmp_path / "out"), image_shape=(32, 32, 3),
                                               classes=listing.classes, filesystem=listing.filesystem)["summary"][0])
        assert [bad[0] for bad in summary["bad"]] == ["memory:///stored-size-test/train/cat/9.png"]
        assert sum(item["rows"] for item in summary["written"]) == 3 * 3
    finally:
        memory.rm("/stored-size-test", recursive=True)


AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """No AWS credentials anywhere; a closed loopback port as the endpoint (nothing is sent to it)."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def _settings(filesystem) -> dict:
    return filesystem.__reduce__()[1][0]


def test_the_drivers_keys_travel_inside_the_s3_filesystem(no_aws):
    filesystem, path = parse_location("s3://bucket/prefix/").resolve()
    assert path == "bucket/prefix" and _settings(filesystem)["access_key"] is None
    assert "no AWS credentials in the environment" in credentials_hint(filesystem)
    no_aws.setenv("AWS_ACCESS_KEY_ID", "AKID")
    no_aws.setenv("AWS_SECRET_ACCESS_KEY", "SECRET")
    filesystem, _ = parse_location("s3://bucket/prefix").resolve()
    assert credentials_hint(filesystem) == ""
    no_aws.delenv("AWS_ACCESS_KEY_ID")
    no_aws.delenv("AWS_SECRET_ACCESS_KEY")
    unpickled = pickle.loads(pickle.dumps(filesystem))  # what a decode task on another node receives
    assert isinstance(unpickled, pafs.S3FileSystem)
    settings = _settings(unpickled)
    assert (settings["access_key"], settings["secret_key"]) == ("AKID", "SECRET")
    assert settings["endpoint_override"] == "http://127.0.0.1:9"
    assert credentials_hint(pafs.LocalFileSystem()) == ""


def test_a_scheme_nobody_knows_is_one_line(no_aws):
    with pytest.raises(UserError, match="cannot open nosuchscheme://x/y"):
        parse_location("nosuchscheme://x/y").resolve()
