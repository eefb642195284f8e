"""Training checkpoint folders (``model.pt`` + ``train_state.pt`` + ``history.json``), written by
:func:`write_checkpoint` and read by :func:`load_train_state` without running anything in them.

A checkpoint folder comes from a run folder or a storage path, so it is a data file like any other: it is
loaded with ``torch.load(weights_only=True)`` only, which refuses any pickle that asks to import or call
something beyond tensors and plain containers. A refused or damaged file raises one-line :class:`UserError`
naming it. The Ray Train worker resumes through :func:`load_train_state`, and the driver calls it on the
newest checkpoint before it resumes a run, so a bad file fails the job at once with exit code 2.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lib.errors import UserError

MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
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
    ``--weights PATH``), ``train_state.pt`` (:data:`TRAIN_STATE_KEYS`) and ``history.json`` (the rows, readable
    without torch)."""
    import json

    folder = Path(folder)
    torch.save(model_state, folder / MODEL_FILE)
    torch.save(dict(train_state), folder / TRAIN_STATE_FILE)
    (folder / HISTORY_FILE).write_text(json.dumps(train_state["history"], indent=1))


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
