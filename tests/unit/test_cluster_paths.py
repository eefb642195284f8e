"""What a cluster run needs before any work: absolute RUN/DATA under RAY_ADDRESS, a code-only upload, and the
GPUs a launcher config can scale to."""

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from jobs import evaluate, pipeline, prepare, train
from lib.planning import launcher_max_gpus

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("job", "prog", "args"), [
    (train, "jobs.train", ["--data-dir", "/mnt/shared/data", "--run-dir", "runs/r1"]),
    (train, "jobs.train", ["--data-dir", "data", "--run-dir", "/mnt/shared/runs/r1"]),
    (evaluate, "jobs.evaluate", ["--data-dir", "/mnt/shared/data", "--run-dir", "runs/r1"]),
    (prepare, "jobs.prepare", ["--source", "cifar10", "--data-dir", "data/cifar10"]),
    (pipeline, "jobs.pipeline", ["--source", "cifar10", "--run-dir", "runs/r1"]),
    (pipeline, "jobs.pipeline", ["--source", "cifar10", "--run-dir", "/mnt/shared/r1", "--storage", "ckpt"]),
])
def test_relative_paths_are_refused_on_a_cluster(job, prog, args, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing is contacted: the check comes first
    monkeypatch.chdir(tmp_path)
    assert job.cli(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: --") and "is a relative path" in lines[0]
    assert "absolute path on storage every node sees" in lines[0]
    assert list(tmp_path.iterdir()) == []


def uploaded(folder: Path, include_gitignore: bool) -> list[str]:
    from onray.ray_internals import package_working_dir

    package = folder.parent / "package.zip"
    package_working_dir(folder, package, include_gitignore=include_gitignore)
    with zipfile.ZipFile(package) as archive:
        return archive.namelist()


@pytest.mark.parametrize("include_gitignore", [True, False])
def test_a_job_submission_uploads_the_code_only(tmp_path, include_gitignore):
    work = tmp_path / "checkout"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked + [".rayignore"]:
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, work / name)
    for junk in ("runs/r1/models/resnet50/model.pt", "data/train/part-0000000.parquet", ".venv/bin/python",
                 ".git/objects/pack/x.pack", "weights.pth", "scratch/embeddings/test.parquet", "eval/index.faiss"):
        (work / junk).parent.mkdir(parents=True, exist_ok=True)
        (work / junk).write_bytes(b"x" * 1024)
    names = uploaded(work, include_gitignore)
    assert "jobs/train.py" in names and "onray/trainer.py" in names and "pyproject.toml" in names
    assert not [n for n in names if n.startswith(("runs/", "data/", ".venv/", ".git/"))
                or n.endswith((".pt", ".pth", ".parquet", ".faiss"))], names


def test_gpus_a_launcher_config_can_scale_to():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert launcher_max_gpus(config) == 4  # four one-GPU workers, from zero
    config["max_workers"] = 2
    assert launcher_max_gpus(config) == 2
    assert launcher_max_gpus({"head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 8}}, "cpu": {"resources": {"CPU": 8}, "max_workers": 10}}}) == 0
    assert launcher_max_gpus({"head_node_type": "h", "available_node_types": {
        "h": {"resources": {"GPU": 1}}, "a": {"resources": {"GPU": 8}, "max_workers": 1},
        "b": {"resources": {"GPU": 1}, "max_workers": 3}}, "max_workers": 2}) == 1 + 8 + 1
