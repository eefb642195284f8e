"""Damaged data and wrong files are caught before any work: one line, exit 2, nothing created."""

import shutil

import pytest

from jobs import evaluate, prepare, train
from lib.data.reader import PreparedData
from lib.errors import UserError
from tests.conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    folder = make_image_folder(root / "images", train_per_class=12, test_per_class=4)
    args = ["--source", f"imagefolder:{folder}", "--data-dir", str(root / "data")]
    assert prepare.cli(args) == 0
    return root / "data", args


def error_lines(capsys):
    """stderr lines that are not progress lines ('[HH:MM:SS] ...')."""
    return [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]


def test_a_truncated_parquet_file_is_named_and_a_prepare_rerun_repairs_it(prepared, tmp_path, capsys):
    data, args = prepared
    damaged = tmp_path / "data"
    shutil.copytree(data, damaged)
    part = sorted((damaged / "train").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(UserError, match=f"damaged prepared data: {part} is not a readable Parquet file"):
        PreparedData.open(damaged)

    run = tmp_path / "run"
    assert train.cli(["--data-dir", str(damaged), "--run-dir", str(run), "--preset", "smoke"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("jobs.train: error: damaged prepared data") and str(part) in lines[0]
    assert "rerun jobs.prepare with the same flags" in lines[0]
    assert evaluate.cli(["--data-dir", str(damaged), "--run-dir", str(run), "--backbones", "resnet50"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("jobs.evaluate: error: damaged prepared data")
    assert not run.exists()  # neither job created anything

    assert prepare.cli([*args[:2], "--data-dir", str(damaged)]) == 0
    assert "is damaged" in capsys.readouterr().err
    assert PreparedData.open(damaged).read_split("train").labels.size == PreparedData.open(data).rows("train")


def test_evaluate_loads_a_wrong_weights_file_before_any_ray_work(prepared, tmp_path, capsys):
    data, _ = prepared
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not a state dict" * 100)
    run = tmp_path / "run"
    code = evaluate.cli(["--data-dir", str(data), "--run-dir", str(run), "--backbones", "resnet50",
                         "--weights", str(weights)])
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("jobs.evaluate: error: cannot read weights file") and str(weights) in lines[0]
    assert not (run / "eval").exists() and not (run / "embeddings").exists()
