"""Bytes changed inside a Parquet file after it was written are one clear line (every file the project writes has
page checksums; driver-side reads verify them), and files without checksums still read."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lib.embedding import read_embeddings, write_split
from lib.errors import UserError
from lib.parquet import read_dataset, read_parquet, write_parquet
from lib.paths import RunPaths


def flip_a_data_byte(path) -> None:
    """Change one byte a third of the way into the file: inside the first column's data pages."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def table(rows: int = 20000) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(rows)], "value": np.arange(rows, dtype=np.int64)})


def test_a_changed_byte_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "t.parquet"
    write_parquet(table(), path)
    assert read_parquet(path).num_rows == 20000
    flip_a_data_byte(path)
    with pytest.raises(UserError, match=f"damaged file: {path} fails its page checksum"):
        read_parquet(path)
    with pytest.raises(UserError, match="damaged file: one of .* fails its page checksum"):
        read_dataset([tmp_path / "t.parquet", tmp_path / "t.parquet"], ["id", "value"])


def test_stored_embeddings_with_a_changed_byte_are_refused(tmp_path):
    run = RunPaths.of(tmp_path / "run")
    vectors = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    path = run.embeddings("resnet50") / "test.parquet"
    write_split(path, np.array([f"test/x/{i:05d}.png" for i in range(3000)]), np.zeros(3000, np.int64), vectors)
    assert read_embeddings(run.root, "resnet50", "test").vectors.shape == (3000, 16)
    flip_a_data_byte(path)
    with pytest.raises(UserError, match="fails its page checksum"):
        read_embeddings(run.root, "resnet50", "test")


def test_a_file_written_without_checksums_still_reads(tmp_path):
    path = tmp_path / "old.parquet"
    pq.write_table(table(100), path)  # as files written before checksums were
    assert read_parquet(path, columns=["value"]).column("value").to_pylist()[:3] == [0, 1, 2]
