import json
import os

import pytest

from lib.errors import UserError
from lib.io import atomic_open, ensure_writable_dir, read_json, replace_dir, staging_dir, write_json


def test_write_json_round_trip(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary left behind


def test_failed_atomic_write_keeps_old_content(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write('{"half": ')
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["m.json"]


def test_replace_dir_swaps_contents(tmp_path):
    final = tmp_path / "train"
    final.mkdir()
    (final / "old.parquet").write_text("old")
    staged = staging_dir(tmp_path, "prepare")
    (staged / "new.parquet").write_text("new")
    replace_dir(staged, final)
    assert os.listdir(final) == ["new.parquet"]
    assert sorted(os.listdir(tmp_path)) == ["train"]


def test_unwritable_output_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"cannot write to output folder {blocker / 'data'}"):
        ensure_writable_dir(blocker / "data")
    with pytest.raises(UserError, match="is a file"):
        ensure_writable_dir(blocker)


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(UserError, match=f"not valid JSON: {bad}"):
        read_json(bad)
