"""The training-subset cache (lib.data.subsets): which ids a per-class subset holds, and its files under RUN/subsets/."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from lib.data.reader import PreparedData
from lib.data.subsets import per_class_subset, write_subset
from lib.data.writer import write_shard_batch
from tests.conftest import image_array


def test_per_class_subset_is_stratified_and_seeded():
    ids = np.array([f"img{i}" for i in range(100)], dtype=object)
    labels = np.arange(100) % 4
    chosen = per_class_subset(ids, labels, 5, seed=0)
    assert len(chosen) == 20
    assert sorted(np.bincount([int(c[3:]) % 4 for c in chosen])) == [5, 5, 5, 5]
    assert list(chosen) == list(per_class_subset(ids, labels, 5, seed=0))
    assert len(per_class_subset(ids, labels, 0, seed=0)) == 100


def test_write_subset_writes_the_chosen_rows_once(tmp_path):
    """A trainer's --train-per-class subset: exactly the chosen rows, in the asked number of files, written once;
    a folder left partial is written again."""
    paths = []
    for i in range(12):
        Image.fromarray(image_array("dog", i)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    batch = {"row": np.arange(12), "id": np.array([f"id{i}" for i in range(12)], dtype=object),
             "label": np.arange(12) % 2, "split": np.array(["train"] * 12, dtype=object),
             "path": np.array(paths, dtype=object)}
    data_dir = tmp_path / "data"
    summary = json.loads(write_shard_batch(batch, out_dir=str(data_dir), image_shape=(32, 32, 3),
                                           classes=["cat", "dog"])["summary"][0])
    (data_dir / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "files": {"train": [w["file"] for w in summary["written"]], "val": [], "test": []}}))
    data = PreparedData.find(data_dir)
    chosen = np.array(["id7", "id1", "id10", "id4", "id3"], dtype=object)
    folder = tmp_path / "run" / "subsets" / "train-demo"
    files = write_subset(data, "train", chosen, folder, parts=2)
    assert [f.split("/")[-1] for f in files] == ["part-000.parquet", "part-001.parquet"]
    tables = [pq.read_table(f) for f in files]
    assert sorted(sum((t.column("id").to_pylist() for t in tables), [])) == sorted(chosen)
    assert all(t.num_rows > 0 for t in tables)
    image = tables[0].column("image").combine_chunks().to_numpy_ndarray()[0]
    row_id = tables[0].column("id")[0].as_py()
    assert np.array_equal(image, image_array("dog", int(row_id[2:])))
    stamps = [Path(f).stat().st_mtime_ns for f in files]
    assert write_subset(data, "train", chosen, folder, parts=2) == files
    assert [Path(f).stat().st_mtime_ns for f in files] == stamps  # found, not written again
    Path(files[1]).unlink()  # an interrupted copy by hand, say
    assert write_subset(data, "train", chosen, folder, parts=2) == files and Path(files[1]).is_file()
    assert not list(folder.parent.glob(".*.tmp"))
