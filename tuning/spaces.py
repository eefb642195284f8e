"""Search spaces as data: ``{TrainConfig field: {kind: arguments}}``, one per preset or from a YAML file.

A space names only keys a tuning result may set (:data:`lib.training.HPARAM_KEYS`), so whatever Tune
finds can go into ``best.json`` and from there into ``jobs.train --hparams``. Kinds::

    margin: {uniform: [0.05, 0.5]}          # float in [low, high]
    lr: {loguniform: [1.0e-4, 1.0e-2]}      # float, uniform in log space (low > 0)
    miner: {choice: [all, hard]}            # one of the values, drawn at random
    loss: {choice: [triplet, proxy_anchor]} # objectives are keys like any other (lib.losses)
    embedding_dim: {grid: [64, 128]}        # every value in turn (random search only)
    weight_decay: 1.0e-4                    # a bare value fixes the key

Nothing here imports Ray until :func:`to_tune` turns a checked space into Tune's distributions.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lib.config import UPPER_BOUNDS, coerce, load_yaml
from lib.errors import UserError
from lib.losses import check_objective
from lib.training import HPARAM_KEYS, TrainConfig

Kind = Literal["uniform", "loguniform", "choice", "grid", "fixed"]
KINDS = ("uniform", "loguniform", "choice", "grid")

# From scratch (smoke, quick) the miner decides whether anything is learned (see lib.training.PRESETS):
# semi-hard mining stays flat there, so quick searches only the miners that learned.
SPACES: dict[str, dict[str, Any]] = {
    "smoke": {"margin": {"uniform": [0.05, 0.5]}, "lr": {"loguniform": [1e-4, 1e-2]}},
    "quick": {"margin": {"uniform": [0.05, 0.5]}, "lr": {"loguniform": [3e-4, 1e-2]},
              "miner": {"choice": ["all", "hard"]}},
    "full": {"margin": {"uniform": [0.05, 0.5]}, "lr": {"loguniform": [3e-5, 3e-3]},
             "miner": {"choice": ["semihard", "hard", "all"]}, "weight_decay": {"loguniform": [1e-5, 1e-3]},
             "embedding_dim": {"choice": [64, 128, 256]},
             # the margin and miner above are the triplet loss's: a space that searches loss names it (loss:
             # {choice: [triplet, proxy_anchor, ...]}) in its own file
             "loss": "triplet"},
}


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One checked key of a space: ``values`` are (low, high) for uniform/loguniform, else the options."""

    kind: Kind
    values: tuple[Any, ...]


Space = dict[str, Dimension]


def _field_type(key: str) -> Any:
    """The TrainConfig field's type without its ``| None`` (a searched value is never None)."""
    tp = typing.get_type_hints(TrainConfig)[key]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def check_space(raw: Any, source: str) -> Space:
    """Validate a space read from ``source`` (a preset name or a file) into :class:`Dimension` entries.

    Unknown or untunable keys, unknown kinds, values of the wrong type and empty ranges are
    :class:`UserError` naming the key and the source.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f"search space in {source} must be a non-empty mapping of keys to ranges")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    space: Space = {}
    for raw_key, spec in raw.items():
        key = str(raw_key).replace("-", "_")
        if key not in HPARAM_KEYS:
            what = "is a training option that cannot be tuned" if key in fields else "is not a training option"
            raise UserError(f"search space key {raw_key!r} in {source} {what} "
                            f"(tunable keys: {', '.join(HPARAM_KEYS)})")
        space[key] = _check_dimension(key, spec, f"key {raw_key!r} in search space {source}")
    return space


def _checked_value(key: str, value: Any) -> Any:
    if key == "loss":
        check_objective(value)  # an unknown objective fails here, before any trial starts
    return value


def _check_dimension(key: str, spec: Any, where: str) -> Dimension:
    tp = _field_type(key)
    if not isinstance(spec, Mapping):
        return Dimension("fixed", (_checked_value(key, coerce(tp, spec, where)),))
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise UserError(f"{where}: expected one of {', '.join(KINDS)} (or a bare value), got {dict(spec)!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, (list, tuple)) or not args:
        raise UserError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    values = tuple(_checked_value(key, coerce(tp, value, where)) for value in args)
    if kind in ("uniform", "loguniform"):
        if tp is not float:
            raise UserError(f"{where}: {kind} needs a float option; use choice or grid for {key}")
        if len(values) != 2 or not values[0] < values[1]:
            raise UserError(f"{where}: {kind} takes [low, high] with low < high, got {list(args)!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise UserError(f"{where}: loguniform needs low > 0, got {values[0]}")
    if tp in (int, float) and any(value <= 0 for value in values) and key != "weight_decay":
        raise UserError(f"{where}: values must be positive, got {list(args)!r}")
    if key in UPPER_BOUNDS and any(value > UPPER_BOUNDS[key] for value in values):
        raise UserError(f"{where}: values must be at most {UPPER_BOUNDS[key]:g}, got {list(args)!r}")
    return Dimension(kind, values)


def preset_space(preset: str) -> Space:
    """The built-in space of a preset (``smoke``, ``quick`` or ``full``)."""
    return check_space(SPACES[preset], f"preset {preset}")


def load_space(path: str | Path) -> Space:
    """A space from a YAML file (``--space space.yaml``)."""
    return check_space(load_yaml(path), str(path))


def searched_keys(space: Space) -> list[str]:
    """Keys that vary between trials, in :data:`HPARAM_KEYS` order."""
    return [key for key in HPARAM_KEYS if key in space and space[key].kind != "fixed"]


def fixed_values(space: Space) -> dict[str, Any]:
    return {key: dim.values[0] for key, dim in space.items() if dim.kind == "fixed"}


def sample_trials(space: Space, num_samples: int, seed: int) -> list[dict[str, Any]]:
    """Every trial of a random search, in order: each of ``num_samples`` rounds runs every grid combination.

    The list depends only on the space, ``num_samples`` and ``seed``, so a rerun of an interrupted tune
    finds the same trials by index and runs only those its record does not hold as finished.
    """
    rng = np.random.default_rng(seed)
    grid_keys = [key for key, dim in space.items() if dim.kind == "grid"]
    trials = []
    for _ in range(num_samples):
        for combination in itertools.product(*(space[key].values for key in grid_keys)):
            trial: dict[str, Any] = dict(zip(grid_keys, combination, strict=True))
            for key, dim in space.items():
                if dim.kind == "uniform":
                    trial[key] = float(rng.uniform(*dim.values))
                elif dim.kind == "loguniform":
                    trial[key] = float(math.exp(rng.uniform(math.log(dim.values[0]), math.log(dim.values[1]))))
                elif dim.kind == "choice":
                    trial[key] = dim.values[int(rng.integers(len(dim.values)))]
            trials.append({key: trial[key] for key in space if key in trial})
    return trials


def to_tune(space: Space) -> dict[str, Any]:
    """Tune's ``param_space`` for the varying keys (fixed keys go into the base config instead)."""
    from ray import tune

    build = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
             "choice": lambda v: tune.choice(list(v)), "grid": lambda v: tune.grid_search(list(v))}
    return {key: build[dim.kind](dim.values) for key, dim in space.items() if dim.kind != "fixed"}

