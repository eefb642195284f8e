import hashlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from lib.errors import UserError
from lib.sources import (
    Source,
    download_cifar10,
    find_cifar10_batches,
    list_image_folder,
    load_cifar10_batches,
    parse_source,
    stable_hash,
    stratified_pick,
)
from tests.conftest import CLASSES, image_array, make_image_folder


def test_parse_source():
    assert parse_source("cifar10") == Source("cifar10")
    assert parse_source("imagefolder:/x/y").path.as_posix() == "/x/y"
    with pytest.raises(UserError, match="unknown --source 'mnist'"):
        parse_source("mnist")
    with pytest.raises(UserError):
        parse_source("imagefolder:")


def test_stratified_pick_is_exact_per_class_and_deterministic():
    labels = np.repeat(np.arange(4), [100, 50, 20, 2])
    ids = [f"img{i}" for i in range(len(labels))]
    mask = stratified_pick(ids, labels, 0.1, seed=0)
    assert [int(mask[labels == c].sum()) for c in range(4)] == [10, 5, 2, 1]  # >= 1 each side
    assert np.array_equal(mask, stratified_pick(ids, labels, 0.1, seed=0))
    assert not np.array_equal(mask, stratified_pick(ids, labels, 0.1, seed=1))
    # depends on ids, not on listing order
    order = np.random.default_rng(0).permutation(len(ids))
    shuffled = stratified_pick([ids[i] for i in order], labels[order], 0.1, seed=0)
    assert set(np.asarray(ids)[mask]) == set(np.asarray(ids)[order][shuffled])


def test_stable_hash_is_fixed():
    # a fixed value: ids and splits must not change between machines or Python versions
    assert stable_hash(0, "train/cat/0001.jpg") == int.from_bytes(
        hashlib.blake2b(b"0:train/cat/0001.jpg", digest_size=8).digest(), "big")


def test_list_image_folder_ids_labels_and_shape(tmp_path):
    root = make_image_folder(tmp_path / "img", train_per_class=3, test_per_class=2)
    listing = list_image_folder(root)
    assert listing.classes == list(CLASSES)
    assert len(listing) == 3 * 3 + 3 * 2
    assert listing.ids[0] == "test/cat/0000.png" or listing.ids[0] == "train/cat/0000.png"
    assert sorted(listing.ids) == sorted(
        f"{s}/{c}/{i:04d}.png" for s, n in (("train", 3), ("test", 2)) for c in CLASSES for i in range(n))
    for file_id, label in zip(listing.ids, listing.labels, strict=True):
        assert CLASSES[label] == file_id.split("/")[1]
    assert listing.image_shape == (32, 32, 3)
    assert list_image_folder(root).ids == listing.ids  # stable


def test_single_tree_is_split_by_seed(tmp_path):
    for name in CLASSES:
        (tmp_path / name).mkdir()
        for i in range(10):
            Image.fromarray(image_array(name, i)).save(tmp_path / name / f"{i}.png")
    listing = list_image_folder(tmp_path, test_fraction=0.2, seed=3)
    for label in range(3):
        assert int(((listing.source_split == "test") & (listing.labels == label)).sum()) == 2


@pytest.mark.parametrize("layout, message", [
    ("missing", "source folder does not exist"),
    ("empty", "no images found in"),
    ("one_class", "only one class folder ('cat')"),
    ("train_only", "image folder has train/ but no test/"),
    ("class_one_split", "class folders must exist under both train/ and test/: ['frog'] only under"),
    ("empty_class", "class folder has no images"),
])
def test_bad_folders(tmp_path, layout, message):
    root = tmp_path / "src"
    if layout != "missing":
        root.mkdir()
    if layout == "one_class":
        make_image_folder(root, 2, 2, classes=("cat",))
    if layout == "train_only":
        make_image_folder(root, 2, 2)
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "test").rglob("*"), reverse=True):
            d.rmdir()
        (root / "test").rmdir()
    if layout == "class_one_split":
        make_image_folder(root, 2, 2, classes=("cat", "dog"))
        make_image_folder(root, 2, 0, classes=("frog",))
        (root / "test" / "frog").rmdir()
    if layout == "empty_class":
        make_image_folder(root, 2, 2)
        (root / "train" / "bird").mkdir()
        (root / "test" / "bird").mkdir()
    with pytest.raises(UserError) as err:
        list_image_folder(root)
    assert message in str(err.value) and str(tmp_path) in str(err.value)


def test_cifar_batches_layout_and_labels(cifar_batches):
    listing = load_cifar10_batches(cifar_batches)
    assert len(listing) == 6 * 20 and listing.images.shape == (120, 32, 32, 3)
    assert listing.ids[:2] == ["train/00000", "train/00001"] and listing.ids[100] == "test/00000"
    assert listing.notes["verified"] is False  # miniature files are not the official ones
    # the official row layout is 1024 red, 1024 green, 1024 blue values
    import pickle

    with open(cifar_batches / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")[b"data"]
    assert np.array_equal(listing.images[0, :, :, 1].ravel(), raw[0, 1024:2048])
    assert find_cifar10_batches(cifar_batches.parent, cifar_batches.parent) == cifar_batches


def test_cifar_batches_missing_files(tmp_path):
    with pytest.raises(UserError, match="not a CIFAR-10 batches folder .*missing batches.meta"):
        find_cifar10_batches(tmp_path, tmp_path)


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (folder, base URL)."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _archive(tmp_path, batches):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_from_url_checks_md5_and_extracts(tmp_path, cifar_batches, http_root):
    www, base = http_root
    archive, md5 = _archive(www, cifar_batches)
    cache = tmp_path / "cache"
    batches = download_cifar10(cache, url=f"{base}/{archive.name}", md5=md5)
    assert len(load_cifar10_batches(batches)) == 120
    assert download_cifar10(cache, url="http://127.0.0.1:9/never-used", md5=md5) == batches  # cached


def test_download_checksum_mismatch(tmp_path, cifar_batches, http_root):
    www, base = http_root
    archive, _ = _archive(www, cifar_batches)
    with pytest.raises(UserError, match="failed its checksum"):
        download_cifar10(tmp_path / "cache", url=f"{base}/{archive.name}", md5="0" * 32)
    assert not list((tmp_path / "cache").glob("*.tar.gz"))  # the bad archive is not kept


def test_download_offline_names_the_alternatives(tmp_path):
    with pytest.raises(UserError) as err:
        download_cifar10(tmp_path / "cache", url="http://127.0.0.1:9/cifar-10-python.tar.gz", md5="0" * 32)
    message = str(err.value)
    assert message.startswith("cannot download CIFAR-10 from http://127.0.0.1:9/")
    assert "--source imagefolder:PATH" in message and "--source cifar10:PATH" in message
    assert "\n" not in message
