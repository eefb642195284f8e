"""The --source registry and the filesystem seam: a kind registered from this module alone parses, validates and
lists; image folders are listed and decoded through any pyarrow filesystem (an in-memory one, a sub-tree of the
local disk) exactly as from a local path."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from lib.data.writer import merge_summaries, write_shard_batch
from lib.errors import UserError
from lib.prepare import PrepareConfig, assign_splits, identity
from lib.sources import (
    DataSource,
    Listing,
    ListOptions,
    file_uri,
    parse_location,
    parse_source,
    register_source,
    source_kinds,
    unregister_source,
)
from lib.sources.imagefolder import ImageFolderSource, list_image_folder
from tests.conftest import CLASSES, image_array, make_image_folder


@register_source("colourgrid")
@dataclass(frozen=True)
class ColourGridSource(DataSource):
    """``colourgrid:N``: N generated images of each of the test classes per split, in memory (a throwaway kind)."""

    per_class: int
    forms = ("colourgrid:N",)

    @classmethod
    def parse(cls, argument: str | None) -> ColourGridSource:
        if argument is None or not argument.isdigit() or int(argument) < 2:
            raise UserError(f"--source colourgrid:N needs a whole number N >= 2, got {argument!r}")
        return cls(int(argument))

    def list_images(self, options: ListOptions) -> Listing:
        rows = [(split, c, i) for split in ("train", "test") for c in range(len(CLASSES)) for i in range(self.per_class)]
        return Listing(classes=list(CLASSES), ids=[f"{s}/{CLASSES[c]}/{i}" for s, c, i in rows],
                       labels=np.array([c for _, c, _ in rows], dtype=np.int64),
                       source_split=np.array([s for s, _, _ in rows], dtype=object), image_shape=(32, 32, 3),
                       images=np.stack([image_array(CLASSES[c], i + (1000 if s == "test" else 0)) for s, c, i in rows]),
                       notes={"layout": "generated"})

    def __str__(self) -> str:
        return f"colourgrid:{self.per_class}"


def test_a_kind_registered_here_is_what_every_parse_and_config_uses(tmp_path):
    assert source_kinds()["colourgrid"] is ColourGridSource and ColourGridSource.kind == "colourgrid"
    spec = parse_source("colourgrid:4")
    assert spec == ColourGridSource(4) and parse_source(str(spec)) == spec
    cfg = PrepareConfig(source="colourgrid:4", data_dir=str(tmp_path / "d"))
    assert cfg.data_source is cfg.data_source == spec  # parsed once, when the config was made
    assert identity(cfg)["source"] == "colourgrid:4"
    listing = cfg.data_source.list_images(cfg.list_options)
    splits = assign_splits(listing, cfg.val_fraction, cfg.seed)
    assert [int((splits == s).sum()) for s in ("train", "val", "test")] == [9, 3, 12]
    with pytest.raises(UserError, match=r"colourgrid:N needs a whole number N >= 2, got 'many'"):
        PrepareConfig(source="colourgrid:many", data_dir=str(tmp_path / "d"))


def test_an_unknown_kind_is_one_line_naming_every_registered_kind():
    with pytest.raises(UserError) as err:
        parse_source("mnist:/data")
    message = str(err.value)
    # every kind registered so far (test modules of this session register more), in order, then their forms
    kinds = message.split("the registered kinds are ")[1].split(";")[0].split(", ")
    assert message.startswith("unknown --source 'mnist:/data': the registered kinds are ") and "\n" not in message
    assert kinds == sorted(kinds) and {"cifar10", "colourgrid", "imagefolder"} <= set(kinds)
    for form in ("cifar10", "cifar10:PATH", "colourgrid:N", "imagefolder:PATH"):
        assert form in message.split("; use ")[1]


def test_registering_a_taken_or_malformed_name_raises():
    with pytest.raises(ValueError, match="'imagefolder' is already registered"):
        register_source("imagefolder")(ColourGridSource)
    with pytest.raises(ValueError, match="must be lower-case"):
        register_source("Bad Name")
    with pytest.raises(TypeError, match="not a DataSource subclass"):
        register_source("plainclass")(dict)
    assert "plainclass" not in source_kinds()
    with pytest.raises(ValueError, match="ColourGridSource is already registered as source kind 'colourgrid'"):
        register_source("colourgrid-again")(ColourGridSource)

    @dataclass(frozen=True)
    class Throwaway(ColourGridSource):
        pass

    assert register_source("throwaway")(Throwaway).kind == "throwaway" and ColourGridSource.kind == "colourgrid"
    assert parse_source("throwaway:2") == Throwaway(2)
    unregister_source("throwaway")
    assert "throwaway" not in source_kinds()
    with pytest.raises(UserError, match="unknown --source 'throwaway:2'"):
        parse_source("throwaway:2")


def test_the_in_memory_listing_is_written_as_parquet_without_any_file(tmp_path):
    listing = ColourGridSource(2).list_images(ListOptions(cache_dir=tmp_path))
    batch = {"row": np.arange(len(listing)), "id": np.array(listing.ids, dtype=object), "label": listing.labels,
             "split": listing.source_split, "image": listing.images}
    summary = json.loads(write_shard_batch(batch, out_dir=str(tmp_path / "out"), image_shape=listing.image_shape,
                                           classes=listing.classes)["summary"][0])
    merged = merge_summaries([summary], listing.classes)
    assert merged["counts"]["train"] == merged["counts"]["test"] == {c: 2 for c in CLASSES} and merged["bad"] == []


# --- image folders through a filesystem object --------------------------------------------------------------

def _odd_tree(root: Path) -> Path:
    """The test image folder plus what listing must skip or order: hidden files and folders, a nested folder."""
    make_image_folder(root, train_per_class=3, test_per_class=2)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / ".hidden-class").mkdir()
    (root / "train" / ".hidden-class" / "x.png").write_bytes(b"junk")
    nested = root / "train" / "dog" / "a-nested"
    nested.mkdir()
    (nested / ".cache").mkdir()
    (nested / ".cache" / "y.png").write_bytes(b"junk")
    from PIL import Image

    Image.fromarray(image_array("dog", 50)).save(nested / "0000.png")
    (root / "train" / "dog" / "zzz.png").write_bytes(b"\x89PNG not really")
    return root


def _copy_to(filesystem: pafs.FileSystem, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        target = f"{prefix}/{path.relative_to(local).as_posix()}"
        if path.is_dir():
            filesystem.create_dir(target)
        else:
            with filesystem.open_output_stream(target) as out:
                out.write(path.read_bytes())


@pytest.fixture
def memory_tree(tmp_path):
    """(an in-memory pyarrow filesystem holding ``bucket/images``, the same tree on the local disk)."""
    local = _odd_tree(tmp_path / "images")
    memory = pafs._MockFileSystem()
    _copy_to(memory, local, "bucket/images")
    return memory, local


def test_a_folder_in_memory_lists_exactly_like_the_same_folder_on_disk(memory_tree):
    memory, local = memory_tree
    on_disk = list_image_folder(local)
    in_memory = list_image_folder("bucket/images", filesystem=memory)
    assert in_memory.ids == on_disk.ids  # same ids in the same (os.walk) order
    assert "train/dog/a-nested/0000.png" in in_memory.ids and in_memory.ids.index("train/dog/zzz.png") < \
        in_memory.ids.index("train/dog/a-nested/0000.png")  # a folder's files before its subfolders
    assert not any("/." in i or ".hidden" in i for i in in_memory.ids)
    assert np.array_equal(in_memory.labels, on_disk.labels)
    assert list(in_memory.source_split) == list(on_disk.source_split)
    assert in_memory.image_shape == on_disk.image_shape == (32, 32, 3)
    assert in_memory.files[0] == f"bucket/images/{in_memory.ids[0]}" and in_memory.filesystem is memory
    assert on_disk.files[0] == str(local / on_disk.ids[0])


def test_files_are_decoded_through_the_filesystem_object(memory_tree):
    memory, local = memory_tree
    listing = list_image_folder("bucket/images", filesystem=memory)
    batch = {"row": np.arange(len(listing)), "id": np.array(listing.ids, dtype=object), "label": listing.labels,
             "split": listing.source_split, "path": np.array(listing.files, dtype=object)}
    out = local.parent / "out"
    summary = json.loads(write_shard_batch(batch, out_dir=str(out), image_shape=(32, 32, 3), classes=listing.classes,
                                           filesystem=memory)["summary"][0])
    assert summary["bad"] == [["mock://bucket/images/train/dog/zzz.png",
                               "UnidentifiedImageError: cannot identify image file "
                               "'mock://bucket/images/train/dog/zzz.png'"]]
    import pyarrow.parquet as pq

    table = pq.read_table(out / summary["written"][0]["file"])
    images = table.column("image").combine_chunks().to_numpy_ndarray()
    for row_id, image in zip(table.column("id").to_pylist(), images, strict=True):
        split, name, *_, file = row_id.split("/")
        index = int(Path(file).stem) + (1000 if split == "test" else 0) if "nested" not in row_id else 50
        assert np.array_equal(image, image_array(name, index)), row_id


def test_errors_name_the_folder_as_the_filesystem_knows_it(memory_tree):
    memory, _ = memory_tree
    with pytest.raises(UserError, match="source folder does not exist: mock://bucket/nope$"):
        list_image_folder("bucket/nope", filesystem=memory)
    memory.delete_dir("bucket/images/test/frog")
    with pytest.raises(UserError, match=r"\['frog'\] only under mock://bucket/images/train$"):
        list_image_folder("bucket/images", filesystem=memory)


def test_a_sub_tree_filesystem_lists_the_same_ids_and_names_the_local_files(tmp_path):
    local = make_image_folder(tmp_path / "images", train_per_class=3, test_per_class=2)
    subtree = pafs.SubTreeFileSystem(str(local), pafs.LocalFileSystem())
    listing = list_image_folder("", filesystem=subtree)
    assert listing.ids == list_image_folder(local).ids and listing.files[0] == listing.ids[0]
    assert file_uri(subtree, listing.files[0]) == str(local / listing.ids[0])
    with pytest.raises(UserError, match=f"source folder does not exist: {local}/missing$"):
        list_image_folder("missing", filesystem=subtree)


def test_a_broken_link_on_disk_is_listed_and_reported_by_the_decoder(tmp_path):
    """On a local disk the listing keeps os semantics: a link loop is a file the user put there, reported as
    unreadable rather than dropped unseen (pyarrow's own local listing leaves such links out)."""
    local = make_image_folder(tmp_path / "images", train_per_class=2, test_per_class=2)
    bad = local / "train" / "dog" / "bad.png"
    bad.symlink_to(local / "train" / "dog" / "loop.png")
    (local / "train" / "dog" / "loop.png").symlink_to(bad)
    listing = list_image_folder(local)
    assert str(bad) in listing.files
    row = listing.files.index(str(bad))
    batch = {"row": np.array([row]), "id": np.array([listing.ids[row]], dtype=object),
             "label": listing.labels[[row]], "split": np.array(["train"], dtype=object),
             "path": np.array([str(bad)], dtype=object)}
    summary = json.loads(write_shard_batch(batch, out_dir=str(tmp_path / "out"), image_shape=(32, 32, 3),
                                           classes=listing.classes)["summary"][0])
    assert summary["bad"][0][0] == str(bad) and summary["written"] == []


def test_locations_resolve_through_pyarrow_and_fail_in_one_line(tmp_path):
    source = parse_source(f"imagefolder:{tmp_path}/")
    assert source == ImageFolderSource(parse_location(str(tmp_path)))
    filesystem, path = source.location.resolve()
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == str(tmp_path)
    with pytest.raises(UserError, match=r"^cannot open nosuchfs://bucket/x: .*nosuchfs"):
        parse_source("imagefolder:nosuchfs://bucket/x").list_images(ListOptions(cache_dir=tmp_path))
    with pytest.raises(UserError, match="reads a local folder or archive, not s3://bucket/cifar"):
        parse_source("cifar10:s3://bucket/cifar").list_images(ListOptions(cache_dir=tmp_path))
    assert os.listdir(tmp_path) == []  # nothing downloaded or created
