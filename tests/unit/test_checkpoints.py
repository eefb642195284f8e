"""Checkpoint folders are data: real ones load with weights_only, crafted or damaged ones raise one line."""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lib.backbones import build_model
from lib.checkpoints import (
    HISTORY_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    checkpoint_epoch,
    checkpoint_name,
    checkpoint_problem,
    load_train_state,
    newest_complete_checkpoint,
    publish_checkpoint,
    seal_checkpoint,
    write_checkpoint,
)
from lib.errors import UserError
from lib.losses import ProxyAnchorObjective
from lib.training import TrainConfig, make_optimizer
from tests.conftest import REPO


class _RunsCode:
    """Pickles as a call of ``func(*args)``: what a crafted file would make ``weights_only=False`` do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch(marker):
    return _RunsCode(os.system, f"touch '{marker}'")


def _tiny_model():
    """Conv + batch norm + linear: the kinds of state resnet50 has, in milliseconds."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 8))


def _training_parts(model_name="tiny", steps_per_epoch=2, seed=0):
    """A model, a proxy objective (3 classes, D = 8) and their AdamW + LambdaLR."""
    cfg = TrainConfig(data_dir="d", run_dir="r", backbones=("resnet50",), preset="smoke").resolve()
    torch.manual_seed(seed)
    model = build_model("resnet50", "none", 8) if model_name == "resnet50" else _tiny_model()
    objective = ProxyAnchorObjective(num_classes=3, embedding_dim=8)
    optimizer, scheduler = make_optimizer(model, cfg, steps_per_epoch, objective)
    return model, objective, optimizer, scheduler


def save_real_checkpoint(folder, model_name="tiny"):
    """One training step of a model + proxy objective + AdamW + LambdaLR, saved as onray.train_loop._report does
    (:func:`lib.checkpoints.write_checkpoint`)."""
    model, objective, optimizer, scheduler = _training_parts(model_name)
    model.train()
    loss, _ = objective(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 0, 1, 2]))
    loss.backward()
    optimizer.step()
    scheduler.step()
    history = [{"epoch": 0, "val_loss": 0.19, "val_map@5": 0.2, "val_p@5": 0.25},
               {"epoch": 1, "train_loss": 0.18, "active_fraction": 0.5, "spread": 1.2, "lr": scheduler.get_last_lr()[0],
                "steps": 1, "images_per_s": 10.5, "epoch_seconds": 0.4, "val_loss": 0.17, "val_map@5": 0.3,
                "val_p@5": 0.35, "resumed_from": 0, "note": "a string"}]
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder, model.state_dict(), {"optimizer": optimizer.state_dict(),
                                                  "scheduler": scheduler.state_dict(),
                                                  "objective": objective.state_dict(), "history": history})
    return model, objective, optimizer, scheduler, history


@pytest.mark.parametrize("model_name", ["resnet50", "tiny"])
def test_a_real_checkpoint_loads_and_resumes(tmp_path, model_name):
    model, objective, optimizer, scheduler, history = save_real_checkpoint(tmp_path / "ckpt", model_name)
    model_state, state = load_train_state(tmp_path / "ckpt", "cpu")
    assert state["history"] == history
    fresh, fresh_objective, fresh_optimizer, fresh_scheduler = _training_parts(model_name, seed=1)
    assert not torch.equal(fresh_objective.loss.proxies, objective.loss.proxies)  # another start
    fresh.load_state_dict(model_state)  # strict, with the state dict's _metadata
    fresh_objective.load_state_dict(state["objective"])
    fresh_optimizer.load_state_dict(state["optimizer"])
    fresh_scheduler.load_state_dict(state["scheduler"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    assert torch.equal(fresh_objective.loss.proxies, objective.loss.proxies)  # the proxies came back
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr() and fresh_scheduler.last_epoch == 1
    saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and len(saved) > 0
    assert all(torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"]) for k in saved)
    proxy_group = fresh_optimizer.param_groups[-1]
    assert proxy_group["params"] == [fresh_objective.loss.proxies] and proxy_group["weight_decay"] == 0.0


def test_the_crafted_file_would_run_code_without_weights_only(tmp_path):
    """The control for the tests below: ``weights_only=False`` runs the crafted pickle."""
    marker = tmp_path / "ran"
    torch.save({"optimizer": _touch(marker), "scheduler": {}, "history": []}, tmp_path / TRAIN_STATE_FILE)
    torch.load(tmp_path / TRAIN_STATE_FILE, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("target", [TRAIN_STATE_FILE, MODEL_FILE])
@pytest.mark.parametrize("writer", ["torch.save", "plain pickle"])
def test_a_crafted_checkpoint_file_is_refused_without_running_it(tmp_path, target, writer):
    folder = tmp_path / "run" / "checkpoint_2025-01-01_00-00-00.000000"
    save_real_checkpoint(folder)
    marker = tmp_path / "ran"
    crafted = {"optimizer": _touch(marker), "scheduler": {}, "history": [{"epoch": 1}]}
    if writer == "torch.save":
        torch.save(crafted, folder / target)
    else:
        (folder / target).write_bytes(pickle.dumps(crafted))
    with pytest.raises(UserError) as err:
        load_train_state(folder, "cpu", run_folder=folder.parent)
    message = str(err.value)
    assert f"refusing to load checkpoint file {folder / target}: " in message and "\n" not in message
    assert f"delete the run's checkpoints ({folder.parent}) or use another --run-dir" in message
    if writer == "torch.save":
        assert "it asks to run posix.system" in message or "it asks to run nt.system" in message
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "not_a_train_state", "no_history",
                                    "no_objective"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    folder = tmp_path / "ckpt"
    save_real_checkpoint(folder)
    path = folder / TRAIN_STATE_FILE
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 10)
    elif damage == "missing":
        path.unlink()
    elif damage == "not_a_train_state":
        torch.save([1, 2, 3], path)
    elif damage == "no_objective":  # proxies that cannot be restored: not a state to resume from
        state = torch.load(path, weights_only=True)
        del state["objective"]
        torch.save(state, path)
    else:
        torch.save({"optimizer": {}, "scheduler": {}, "objective": {}, "history": []}, path)
    with pytest.raises(UserError) as err:
        load_train_state(folder, "cpu")
    message = str(err.value)
    assert str(path) in message and "delete it or use another --run-dir" in message and "\n" not in message


def test_the_driver_checks_the_newest_complete_checkpoint_before_resuming(tmp_path, capsys):
    from onray.trainer import check_resume_checkpoint, local_run_folder

    storage, name = tmp_path / "models" / "resnet50", "resnet50-0123456789"
    check_resume_checkpoint(str(storage), name)  # nothing there yet: a fresh run
    save_real_checkpoint(storage / name / "checkpoint_2025-01-01_00-00-00.000000")
    check_resume_checkpoint(str(storage), name)  # a real checkpoint passes
    newest = storage / name / "checkpoint_2025-01-01_00-00-05.000000"
    save_real_checkpoint(newest)
    marker = tmp_path / "ran"
    torch.save({"optimizer": _touch(marker)}, newest / TRAIN_STATE_FILE)
    # as its writer left it, a changed file is passed over, named, and the one before is the one to resume from
    check_resume_checkpoint(str(storage), name, "resnet50")
    err = capsys.readouterr().err
    assert (f"resnet50: passing over incomplete checkpoint {newest.name} ({TRAIN_STATE_FILE} has" in err
            and "resuming from the newest complete checkpoint, checkpoint_2025-01-01_00-00-00.000000 (epoch 1)" in err)
    seal_checkpoint(newest)  # whoever crafted the file wrote checkpoint.json for it too
    with pytest.raises(UserError, match=f"refusing to load checkpoint file {newest / TRAIN_STATE_FILE}: .*"
                                        f"delete the run's checkpoints \\({storage / name}\\)"):
        check_resume_checkpoint(str(storage), name)
    with pytest.raises(UserError):
        check_resume_checkpoint(f"file://{storage}", name)
    assert not marker.exists()
    check_resume_checkpoint("s3://bucket/models", name)  # remote storage: left to the workers
    assert local_run_folder("s3://bucket/models", name) is None
    assert local_run_folder(str(storage), name) == storage / name


def test_a_checkpoint_is_complete_only_when_every_file_matches_its_manifest(tmp_path):
    folder = tmp_path / "checkpoint_2025-01-01_00-00-00.000000"
    save_real_checkpoint(folder)
    assert checkpoint_problem(folder) is None and checkpoint_epoch(folder) == 1
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {MODEL_FILE, TRAIN_STATE_FILE, HISTORY_FILE}
    assert all(manifest["files"][name]["bytes"] == (folder / name).stat().st_size for name in manifest["files"])
    whole = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(whole[: len(whole) // 3])  # what a full disk left of it
    assert checkpoint_problem(folder) == f"{MODEL_FILE} has {len(whole) // 3} bytes of {len(whole)} bytes"
    (folder / MODEL_FILE).write_bytes(b"")
    assert checkpoint_problem(folder) == f"{MODEL_FILE} has 0 bytes of {len(whole)} bytes"
    (folder / MODEL_FILE).write_bytes(bytes(len(whole)))  # the right size, other bytes
    assert "its SHA-256 differs" in checkpoint_problem(folder)
    (folder / MODEL_FILE).unlink()
    assert checkpoint_problem(folder) == f"{MODEL_FILE} is missing"
    (folder / MANIFEST_FILE).write_text('{"epoch": 1, "fil')
    assert checkpoint_problem(folder) == f"{MANIFEST_FILE} is not readable JSON"
    (folder / MANIFEST_FILE).unlink()
    assert checkpoint_problem(folder) == f"no {MANIFEST_FILE}: its writing never finished"


def test_the_newest_complete_checkpoint_is_chosen_and_the_newer_incomplete_ones_named(tmp_path):
    run = tmp_path / "resnet50-0123456789"
    assert newest_complete_checkpoint(run) == (None, [])
    older, complete, cut, empty = (run / f"checkpoint_2025-01-01_00-00-0{i}.000000" for i in range(4))
    save_real_checkpoint(older)
    save_real_checkpoint(complete)
    save_real_checkpoint(cut)
    (cut / TRAIN_STATE_FILE).write_bytes((cut / TRAIN_STATE_FILE).read_bytes()[:100])
    empty.mkdir()  # a folder of 0-byte files, without checkpoint.json
    for name in (MODEL_FILE, TRAIN_STATE_FILE):
        (empty / name).touch()
    (run / ".partial-checkpoint_2025-01-01_00-00-09.000000.abc").mkdir()  # being written: never a candidate
    newest, passed_over = newest_complete_checkpoint(run)
    assert newest == complete
    assert [(folder, problem.split(" ")[0]) for folder, problem in passed_over] == [(empty, "no"),
                                                                                   (cut, TRAIN_STATE_FILE)]


def test_a_published_checkpoint_appears_whole_and_a_crash_leftover_goes(tmp_path):
    model, objective, optimizer, scheduler, history = save_real_checkpoint(tmp_path / "first")
    state = load_train_state(tmp_path / "first")
    leftover = tmp_path / "run" / ".partial-checkpoint_2025-01-01_00-00-00.000000.xyz"
    leftover.mkdir(parents=True)
    (leftover / MODEL_FILE).write_bytes(b"cut short by a crash")
    name = checkpoint_name()
    published = publish_checkpoint(tmp_path / "run", name, *state)
    assert published == tmp_path / "run" / name and checkpoint_problem(published) is None
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [name]  # no leftover, no temporary
    assert load_train_state(published)[1]["history"] == history
    assert checkpoint_name() > name  # names sort by time


FULL_DISK = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from lib.checkpoints import publish_checkpoint
    run = os.path.join(sys.argv[2], "run")
    state = {"optimizer": {}, "scheduler": {}, "objective": {}, "history": [{"epoch": 1}]}
    try:
        publish_checkpoint(run, "checkpoint_2025-01-01_00-00-00.000000", {"w": torch.zeros(1_000_000)}, state)
        found = {"errno": None}
    except OSError as err:
        found = {"errno": err.errno, "filename": err.filename}
    found["left"] = sorted(os.listdir(run))
    print(json.dumps(found))
""")


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("mount") is None, reason="needs unshare, mount")
def test_a_full_disk_while_publishing_is_enospc_naming_the_file_and_leaves_no_folder(tmp_path):
    """A real full disk: a 1 MiB tmpfs in a mount namespace of its own, and a 4 MB model."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "publish.py"
    script.write_text(FULL_DISK)
    command = f"mount -t tmpfs -o size=1m tmpfs {disk} && {sys.executable} {script} {REPO} {disk}"
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", command], capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0 and "mount" in done.stderr and not done.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["errno"] == errno.ENOSPC
    assert found["filename"] == str(disk / "run" / "checkpoint_2025-01-01_00-00-00.000000" / MODEL_FILE)
    assert found["left"] == []  # no checkpoint folder, no temporary one
