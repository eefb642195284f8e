"""Training checkpoint folders (``model.pt`` + ``train_state.pt`` + ``history.json`` + ``checkpoint.json``),
written by :func:`write_checkpoint`, published whole by :func:`publish_checkpoint` and read by
:func:`load_train_state` without running anything in them.

A checkpoint is complete when its ``checkpoint.json``, written last, lists every other file with its size
and SHA-256 and the files match (:func:`checkpoint_problem`). :func:`publish_checkpoint` writes a checkpoint
under a hidden temporary name, checks it and only then renames it to its ``checkpoint_*`` name, so a full
disk or a crash never leaves a ``checkpoint_*`` folder that looks complete but is not.
:func:`newest_complete_checkpoint` is what a run resumes from; folders that do not verify are passed over
and named.

A checkpoint folder comes from a run folder or a storage path, so it is a data file like any other: it is
loaded with ``torch.load(weights_only=True)`` only, which refuses any pickle that asks to import or call
something beyond tensors and plain containers. A refused or damaged file raises one-line :class:`UserError`
naming it. The Ray Train worker resumes through :func:`load_train_state`, and the driver calls it on the
newest complete checkpoint before it resumes a run, so a bad file fails the job at once with exit code 2.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lib.errors import UserError

MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
# written last: each other file's size and SHA-256, and the epoch; a folder without it is not a checkpoint yet
MANIFEST_FILE = "checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint_"  # the names sort by time (Ray Train's own names have the same form)
PARTIAL_PREFIX = ".partial-"  # a checkpoint being written; never read
# optimizer and scheduler state dicts, the objective's state dict (its proxies; empty for a loss without
# parameters) and the per-epoch metric rows
TRAIN_STATE_KEYS = ("optimizer", "scheduler", "objective", "history")


def _remedy(run_folder: str | Path | None) -> str:
    where = f"the run's checkpoints ({run_folder})" if run_folder else "it"
    return f"delete {where} or use another --run-dir"


def refused_global(err: pickle.UnpicklingError) -> str | None:
    """The ``module.name`` a ``torch.load(weights_only=True)`` refusal names (``posix.system``), if any."""
    refused = re.search(r"GLOBAL (\S+)", str(err))
    return refused.group(1) if refused else None


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` without torch's warnings about unusual pickle protocols."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def _load(path: Path, map_location: Any, run_folder: str | Path | None) -> Any:
    try:
        return safe_torch_load(path, map_location)
    except pickle.UnpicklingError as err:
        refused = refused_global(err)
        if refused:
            raise UserError(f"refusing to load checkpoint file {path}: it asks to run {refused}, which a "
                            f"checkpoint of this project never does; {_remedy(run_folder)}") from None
        raise UserError(f"refusing to load checkpoint file {path}: it is not a plain PyTorch state file "
                        f"(weights_only load failed); {_remedy(run_folder)}") from None
    except FileNotFoundError:
        raise UserError(f"checkpoint file is missing: {path}; {_remedy(run_folder)}") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, bad magic, ...: the file is damaged
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f"cannot read checkpoint file {path} (damaged: {detail}); {_remedy(run_folder)}") from None


def write_checkpoint(folder: str | Path, model_state: Mapping[str, Any], train_state: Mapping[str, Any]) -> None:
    """Write a checkpoint folder: ``model.pt`` (the network's state dict alone, so it also loads as
    ``--weights PATH``), ``train_state.pt`` (:data:`TRAIN_STATE_KEYS`), ``history.json`` (the rows, readable
    without torch) and, last, ``checkpoint.json`` (:data:`MANIFEST_FILE`).

    Each file is serialised in memory and written with one ``write`` and an ``fsync``, so a full disk is an
    ``OSError`` with its errno (``ENOSPC``) and the file's name, not torch's ``RuntimeError`` from deep inside
    its zip writer.
    """
    folder = Path(folder)
    contents = {MODEL_FILE: _torch_bytes(model_state), TRAIN_STATE_FILE: _torch_bytes(dict(train_state)),
                HISTORY_FILE: json.dumps(train_state["history"], indent=1).encode()}
    for name, data in contents.items():
        _write_synced(folder / name, data)
    _write_manifest(folder, contents, train_state["history"][-1]["epoch"])


def seal_checkpoint(folder: str | Path) -> None:
    """Write ``checkpoint.json`` again for the files as they are now in ``folder`` (a test that plants a state
    in a checkpoint on purpose seals it, as anyone who can write the run folder could)."""
    folder = Path(folder)
    contents = {name: (folder / name).read_bytes() for name in (MODEL_FILE, TRAIN_STATE_FILE, HISTORY_FILE)}
    _write_manifest(folder, contents, json.loads(contents[HISTORY_FILE])[-1]["epoch"])


def _torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _write_synced(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None  # a failed write() does not name its file


def _write_manifest(folder: Path, contents: Mapping[str, bytes], epoch: int) -> None:
    manifest = {"epoch": int(epoch),
                "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in contents.items()}}
    _write_synced(folder / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size} bytes"


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (``"no checkpoint.json: its writing never finished"``,
    ``"model.pt has 27.5 MB of 94.6 MB"``, ...), or None when every file ``checkpoint.json`` lists is there with
    its size and SHA-256. Reads every file once."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}: its writing never finished"
    except (OSError, ValueError):
        return f"{MANIFEST_FILE} is not readable JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or set(files) != {MODEL_FILE, TRAIN_STATE_FILE, HISTORY_FILE}
            or not isinstance(manifest.get("epoch"), int)
            or not all(isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                       and isinstance(entry.get("sha256"), str) for entry in files.values())):
        return f"{MANIFEST_FILE} is not the list of files this project writes"
    for name, entry in files.items():
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            return f"{name} is missing"
        if len(data) != entry["bytes"]:
            return f"{name} has {_megabytes(len(data))} of {_megabytes(entry['bytes'])}"
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return f"{name} is not the file that was written (its SHA-256 differs)"
    return None


def checkpoint_epoch(folder: str | Path) -> int:
    """The last trained epoch of a complete checkpoint (from its ``checkpoint.json``)."""
    return int(json.loads((Path(folder) / MANIFEST_FILE).read_bytes())["epoch"])


def newest_complete_checkpoint(run_folder: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest ``checkpoint_*`` folder of ``run_folder`` that is complete (:func:`checkpoint_problem`), or None,
    and the newer folders passed over with why: ``[(folder, "train_state.pt has 27.5 MB of 94.6 MB")]``."""
    run_folder = Path(run_folder)
    candidates = sorted((path for path in run_folder.glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()), reverse=True)
    passed_over = []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, passed_over
        passed_over.append((folder, problem))
    return None, passed_over


def checkpoint_name() -> str:
    """A new checkpoint folder's name: ``checkpoint_<UTC time to the microsecond>``, so names sort by time."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{CHECKPOINT_PREFIX}{now:%Y-%m-%d_%H-%M-%S.%f}"


def publish_checkpoint(run_folder: str | Path, name: str, model_state: Mapping[str, Any],
                       train_state: Mapping[str, Any]) -> Path:
    """Write a checkpoint as ``run_folder/name``: first under a hidden temporary name beside it, then checked
    (:func:`checkpoint_problem`, every file read back), then renamed into place, so ``run_folder/name`` appears
    complete or not at all. Returns its path.

    Raises the ``OSError`` of a full or read-only disk (``ENOSPC``, ...) with the temporary folder removed; a
    temporary folder an earlier crash left behind is removed first. One writer per run folder (rank 0).
    """
    run_folder = Path(run_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    for leftover in run_folder.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staged = Path(tempfile.mkdtemp(dir=run_folder, prefix=f"{PARTIAL_PREFIX}{name}."))
    final = run_folder / name
    try:
        write_checkpoint(staged, model_state, train_state)
        problem = checkpoint_problem(staged)
        if problem is not None:  # the disk took the writes but does not give them back
            raise OSError(errno.EIO, f"checkpoint did not read back as written ({problem})", str(final))
        os.rename(staged, final)
        return final
    except OSError as err:
        shutil.rmtree(staged, ignore_errors=True)
        if err.filename and Path(err.filename).parent == staged:  # name the file where people will look for it
            raise OSError(err.errno, err.strerror, str(final / Path(err.filename).name)) from None
        raise
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def load_train_state(folder: str | Path, device: str | torch.device = "cpu", *,
                     run_folder: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``folder``'s ``model.pt`` (onto ``device``) and ``train_state.pt`` (onto the CPU).

    Returns ``(model_state, train_state)``; ``train_state`` holds ``optimizer``, ``scheduler`` and ``objective``
    state dicts and ``history``, the per-epoch metric rows. Raises :class:`UserError` naming the file when a file is
    refused by ``weights_only`` loading, damaged or of the wrong shape. ``run_folder`` (the folder that holds
    the run's checkpoints) only sharpens the message's advice.
    """
    folder = Path(folder)
    model_state = _load(folder / MODEL_FILE, device, run_folder)
    if not isinstance(model_state, Mapping):
        raise UserError(f"checkpoint file {folder / MODEL_FILE} holds a {type(model_state).__name__}, "
                        f"not a model state dict; {_remedy(run_folder)}")
    path = folder / TRAIN_STATE_FILE
    train_state = _load(path, "cpu", run_folder)
    history = train_state.get("history") if isinstance(train_state, Mapping) else None
    if (not isinstance(train_state, Mapping) or not all(key in train_state for key in TRAIN_STATE_KEYS)
            or not all(isinstance(train_state[key], Mapping) for key in ("optimizer", "scheduler", "objective"))
            or not isinstance(history, list) or not history
            or not all(isinstance(row, Mapping) and isinstance(row.get("epoch"), int) for row in history)):
        raise UserError(f"checkpoint file {path} is not a training state (optimizer, scheduler, objective and a "
                        f"history of epochs); {_remedy(run_folder)}")
    return model_state, train_state  # as loaded: a state dict's _metadata must survive
