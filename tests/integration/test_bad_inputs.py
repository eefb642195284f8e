"""The remaining bad inputs a user meets: each is one line and exit 2 with nothing half-written, or, where the
input is valid but odd (a 1x1 or a 4000x4000 image, spaces and non-ASCII in paths), a normal run."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from jobs import prepare, train
from lib.backbones import build_model
from lib.data.reader import PreparedData
from tests.conftest import REPO, image_array, make_image_folder

pytestmark = pytest.mark.usefixtures("ray_session")


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    folder = make_image_folder(root / "images", train_per_class=16, test_per_class=4)
    assert prepare.cli(["--source", f"imagefolder:{folder}", "--data-dir", str(root / "data")]) == 0
    return root / "data"


def test_tiny_and_huge_images_and_odd_paths_are_prepared(tmp_path):
    folder = make_image_folder(tmp_path / "my images ü", train_per_class=6, test_per_class=3)
    odd = folder / "train" / "cat"
    Image.fromarray(image_array("cat", 1)[:1, :1]).save(odd / "tiny 1x1.png")
    Image.new("RGB", (4000, 4000), (200, 40, 40)).save(odd / "huge ü.png")
    data = tmp_path / "prepared data é"
    assert prepare.cli(["--source", f"imagefolder:{folder}", "--data-dir", str(data)]) == 0
    manifest = PreparedData.open(data).manifest
    assert manifest["converted"]["resized"] == 2 and manifest["totals"]["train"] + manifest["totals"]["val"] == 20
    ids = set(PreparedData.open(data).read_split("train").ids) | set(PreparedData.open(data).read_split("val").ids)
    assert {"train/cat/tiny 1x1.png", "train/cat/huge ü.png"} <= ids


@pytest.mark.parametrize("kind", ["zero-byte", "symlink loop"])
def test_unreadable_files_are_one_line_and_nothing_is_written(tmp_path, capsys, kind):
    folder = make_image_folder(tmp_path / "images", train_per_class=4, test_per_class=2)
    bad = folder / "train" / "dog" / "bad.png"
    if kind == "zero-byte":
        bad.write_bytes(b"")
    else:
        bad.symlink_to(folder / "train" / "dog" / "loop.png")
        (folder / "train" / "dog" / "loop.png").symlink_to(bad)
    data = tmp_path / "data"
    assert prepare.cli(["--source", f"imagefolder:{folder}", "--data-dir", str(data)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("jobs.prepare: error: cannot read image") and "bad.png" in lines[0]
    assert not data.exists()


def test_bad_training_inputs_are_one_line_and_create_nothing(data, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--data-dir", str(data), "--run-dir", str(run), "--preset", "smoke"]
    (tmp_path / "wrong-type.yaml").write_text("epochs: many\n")
    (tmp_path / "best.json").write_text("{margin: 0.2")
    torch.save(build_model("resnet50", "none", 32).state_dict(), tmp_path / "resnet50.pt")
    cases = [
        (["--config", str(tmp_path / "wrong-type.yaml")], "expected int, got 'many'"),
        (["--hparams", str(tmp_path / "best.json")], "hyper-parameter file is not JSON"),
        (["--backbones", "vgg16", "--weights", str(tmp_path / "resnet50.pt")], "resnet50.pt"),
        (["--epochs", "0"], "--epochs must be positive"),
    ]
    for extra, message in cases:
        assert train.cli([*base, *extra]) == 2, extra
        lines = error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("jobs.train: error: ") and message in lines[0], (extra, lines)
        assert not run.exists(), extra
    assert json.loads((data / "manifest.json").read_text())["totals"]["train"] > 0  # DATA untouched


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_an_offline_cifar10_pipeline_is_one_line_and_leaves_no_run_folder(tmp_path):
    """Truly offline: a network namespace of its own, without interfaces, where the download cannot resolve."""
    run = tmp_path / "runs" / "r1"
    # a home of its own: no CIFAR-10 archive in its cache (~/.cache/cifar-embeddings)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "HOME": str(tmp_path / "home")}
    done = subprocess.run(["unshare", "--net", "--map-root-user", sys.executable, "-m", "jobs.pipeline",
                           "--source", "cifar10", "--run-dir", str(run), "--preset", "smoke"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 2 and "unshare" in done.stderr:
        pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()[-200:]}")
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("jobs.pipeline: error: cannot download CIFAR-10") and "imagefolder:PATH" in errors[0]
    assert not run.exists()  # no empty RUN left behind
