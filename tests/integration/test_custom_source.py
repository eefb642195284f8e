"""A source kind added by this module alone runs through the real jobs.prepare on Ray: an image folder read only
through a pyarrow filesystem object (a SubTreeFileSystem, whose paths are not local paths), decoded in the
Ray Data tasks through that object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from jobs import prepare
from lib.data.reader import SPLITS, PreparedData, read_manifest
from lib.errors import UserError
from lib.sources import DataSource, Listing, ListOptions, register_source
from lib.sources.imagefolder import list_image_folder
from tests.conftest import CLASSES, make_image_folder

pytestmark = pytest.mark.usefixtures("ray_session")


@register_source("subtree")
@dataclass(frozen=True)
class SubTreeSource(DataSource):
    """``subtree:PATH``: the image folder at PATH, seen through ``SubTreeFileSystem(PATH)`` (paths relative to it)."""

    root: str
    forms = ("subtree:PATH",)

    @classmethod
    def parse(cls, argument: str | None) -> SubTreeSource:
        if not argument:
            raise UserError("--source subtree needs a folder: subtree:PATH")
        return cls(str(Path(argument).absolute()))

    def list_images(self, options: ListOptions) -> Listing:
        filesystem = pafs.SubTreeFileSystem(self.root, pafs.LocalFileSystem())
        return list_image_folder("", options.test_fraction, options.seed, filesystem=filesystem)

    def __str__(self) -> str:
        return f"subtree:{self.root}"


def errors(capsys) -> list[str]:
    """The job's error lines on stderr (progress lines and Ray's own log lines aside)."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("jobs.prepare:")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(the image folder, DATA prepared from it as ``subtree:FOLDER``), prepared once for the module."""
    root = tmp_path_factory.mktemp("custom-source")
    folder = make_image_folder(root / "images")
    return folder, prepare.main(prepare.PrepareConfig(source=f"subtree:{folder}", data_dir=str(root / "data")))


def test_a_registered_kind_prepares_through_its_filesystem(prepared, tmp_path):
    folder, data = prepared
    manifest = read_manifest(data)
    assert manifest["source"] == f"subtree:{folder}" and manifest["classes"] == list(CLASSES)
    assert manifest["counts"] == {"train": {c: 9 for c in CLASSES}, "val": {c: 1 for c in CLASSES},
                                  "test": {c: 4 for c in CLASSES}}
    data_set = PreparedData.open(data)
    for split in SPLITS:
        rows = data_set.read_split(split)
        for row_id, image in zip(rows.ids, rows.images, strict=True):  # every pixel as in the file
            assert np.array_equal(image, np.asarray(Image.open(folder / row_id))), row_id
    # the same images from imagefolder:PATH: the ids and splits do not depend on how the files are reached
    local = prepare.main(prepare.PrepareConfig(source=f"imagefolder:{folder}", data_dir=str(tmp_path / "local")))
    assert read_manifest(local)["counts"] == manifest["counts"]
    assert {s: sorted(PreparedData.open(local).read_split(s).ids) for s in SPLITS} == \
        {s: sorted(data_set.read_split(s).ids) for s in SPLITS}


def test_bad_files_on_the_filesystem_are_named_as_local_files(image_folder, tmp_path, capsys):
    bad = image_folder / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["--source", f"subtree:{image_folder}", "--data-dir", str(tmp_path / "data")]
    assert prepare.cli(args) == 2
    lines = errors(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"jobs.prepare: error: cannot read image {bad} ")
    assert not (tmp_path / "data").exists()
    assert prepare.cli([*args, "--skip-bad-images"]) == 0
    assert [s["path"] for s in read_manifest(tmp_path / "data")["skipped"]] == [str(bad)]
