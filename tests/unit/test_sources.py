import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from lib.errors import UserError
from lib.sources import Location, parse_source, stable_hash, stratified_pick
from lib.sources.cifar10 import Cifar10Source, download_cifar10, find_cifar10_batches, load_cifar10_batches
from lib.sources.imagefolder import ImageFolderSource, list_image_folder
from tests.conftest import CLASSES, image_array, make_image_folder


def test_parse_source(tmp_path, monkeypatch):
    assert parse_source("cifar10") == Cifar10Source() and str(parse_source("cifar10")) == "cifar10"
    assert parse_source("imagefolder:/x/y/") == ImageFolderSource(Location("/x/y"))
    assert str(parse_source("CIFAR10:/data/c")) == "cifar10:/data/c"  # the text the manifest records
    monkeypatch.chdir(tmp_path)
    assert str(parse_source("imagefolder:rel/dir")) == f"imagefolder:{tmp_path}/rel/dir"  # made absolute
    assert str(parse_source("imagefolder:s3://Bucket/prefix/")) == "imagefolder:s3://Bucket/prefix"
    for text in ("cifar10", "cifar10:/a/b", "imagefolder:/a b/ü", "imagefolder:gs://b/p"):
        assert parse_source(str(parse_source(text))) == parse_source(text)
    with pytest.raises(UserError, match="unknown --source 'mnist'"):
        parse_source("mnist")
    with pytest.raises(UserError, match="imagefolder:PATH"):
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


# --- untrusted CIFAR-10 pickles: only numpy array reconstruction may be unpickled --------------------------

class _RunsCode:
    """Pickles as a call of ``func(*args)``: what a crafted file would make an unrestricted unpickler do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _crafted_meta(batches, payload):
    with open(batches / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": payload, b"num_vis": 3072}, handle)


def _touch_payloads(marker):
    return {
        "os.system": (_RunsCode(os.system, f"touch '{marker}'"), "posix.system" if os.name == "posix" else "system"),
        "builtins.exec": (_RunsCode(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "subprocess.Popen": (_RunsCode(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
    }


def test_crafted_payload_would_run_code_with_plain_pickle(tmp_path, cifar_batches):
    """The control for the tests below: an unrestricted unpickler does run the crafted batches.meta."""
    marker = tmp_path / "ran"
    _crafted_meta(cifar_batches, _touch_payloads(marker)["builtins.exec"][0])
    with open(cifar_batches / "batches.meta", "rb") as handle:
        pickle.load(handle, encoding="bytes")
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.Popen"])
def test_crafted_batch_is_refused_without_running_it(tmp_path, cifar_batches, kind):
    marker = tmp_path / "ran"
    payload, qualified = _touch_payloads(marker)[kind]
    _crafted_meta(cifar_batches, payload)
    with pytest.raises(UserError) as err:
        load_cifar10_batches(cifar_batches)
    message = str(err.value)
    assert message.startswith(f"refusing to load {cifar_batches / 'batches.meta'}: it asks to run ")
    assert qualified in message and "which a CIFAR-10 batch never does" in message and "\n" not in message
    assert not marker.exists()


def test_crafted_data_batch_is_refused(tmp_path, cifar_batches):
    marker = tmp_path / "ran"
    with open(cifar_batches / "test_batch", "wb") as handle:
        pickle.dump({b"data": _RunsCode(os.system, f"touch '{marker}'"), b"labels": [0]}, handle)
    with pytest.raises(UserError, match=f"refusing to load {cifar_batches / 'test_batch'}: it asks to run"):
        load_cifar10_batches(cifar_batches)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_dict", "bad_labels"])
def test_damaged_batch_is_one_line_naming_it(cifar_batches, damage):
    path = cifar_batches / "data_batch_3"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01 this is not a pickle at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_a_dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    else:
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"x", b"y"]}))
    with pytest.raises(UserError) as err:
        load_cifar10_batches(cifar_batches)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2 with numpy 1 wrote for the official files: protocol 2, str and bytes as 8-bit
    strings, arrays as ``numpy.core.multiarray._reconstruct``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_8bit(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        name = name or obj.__qualname__
        module = {"_reconstruct": "numpy.core.multiarray", "ndarray": "numpy", "dtype": "numpy"}[name]
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_8bit


@pytest.mark.parametrize("style", ["python2-protocol2", "protocol5"])
def test_official_and_newer_pickle_styles_still_load(cifar_batches, style):
    expected = load_cifar10_batches(cifar_batches)  # the fixture's own files (numpy 2, default protocol)
    for path in sorted(cifar_batches.iterdir()):
        with open(path, "rb") as handle:
            raw = pickle.load(handle, encoding="bytes")
        if style == "protocol5":  # what Python 3.14's default protocol writes
            path.write_bytes(pickle.dumps(raw, protocol=5))
        else:
            buffer = io.BytesIO()
            _Python2Pickler(buffer, protocol=2).dump({k.decode(): v for k, v in raw.items()})
            assert path.name == "batches.meta" or b"cnumpy.core.multiarray\n_reconstruct\n" in buffer.getvalue()
            path.write_bytes(buffer.getvalue())
    listing = load_cifar10_batches(cifar_batches)
    assert listing.classes == expected.classes and listing.ids == expected.ids
    assert np.array_equal(listing.images, expected.images) and np.array_equal(listing.labels, expected.labels)


def test_prepare_refuses_a_crafted_batch_before_ray_starts(tmp_path, cifar_batches):
    """The whole job: exit 2, one line naming the file, nothing run, no DATA folder, no Ray started."""
    marker = tmp_path / "ran"
    _crafted_meta(cifar_batches, _touch_payloads(marker)["os.system"][0])
    data = tmp_path / "d"
    out = subprocess.run([sys.executable, "-m", "jobs.prepare", "--source", f"cifar10:{cifar_batches}",
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("[")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"jobs.prepare: error: refusing to load {cifar_batches / 'batches.meta'}: ")
    assert "started a local Ray" not in out.stderr
    assert not marker.exists()
    assert not data.exists()
