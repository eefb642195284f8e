"""Typed job configs: one frozen dataclass per job, a CLI generated from its fields.

Precedence, lowest to highest: the dataclass defaults, ``--config file.yaml``, command-line flags
(the two-stage parse timm uses). Unknown keys in the YAML file, or in a dict rebuilt inside a Ray
worker, are errors rather than silently ignored: a typo must fail at once, not an hour later.

Supported field types: ``str``, ``int``, ``float``, ``bool`` (``--x/--no-x``), ``Literal[...]``
(choices), ``X | None``, ``tuple[str, ...]`` (comma-separated on the command line) and a nested frozen
config dataclass of such fields: its fields become flags ``--<outer>-<inner>`` (``--loss-params-temperature``),
a YAML file gives it as a mapping (``loss_params: {temperature: 0.2}``, unknown keys are errors) and
:func:`to_dict` writes it as one. Each field's ``metadata["help"]`` becomes its ``--help`` text.

A config that passes some of another config's settings through declares them once by name with
:func:`fields_from` (``PipelineConfig`` takes ``--epochs``, ``--lr``, ... from ``TrainConfig``): type,
default and help text come from the other config's fields, so a new setting there needs only its name here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from lib.errors import UserError

C = TypeVar("C")

_MISSING = dataclasses.MISSING
# metadata key of a field that :func:`fields_from` took from another config: the config it came from
BORROWED_FROM = "borrowed_from"
HEADING = "heading"  # metadata key: the --help section of a field from fields_from


def option(default: Any = _MISSING, help: str = "", positional: bool = False,  # noqa: A002 - argparse's name
           **kwargs: Any) -> Any:
    """A dataclass field with ``--help`` text; ``default`` omitted makes the flag required. ``positional``: a
    ``tuple[str, ...]`` field taken from the command line's positional arguments (one or more) instead of a flag."""
    return dataclasses.field(default=default, metadata={"help": help, "positional": positional}, **kwargs)


def fields_from(source: type, names: Sequence[str], heading: str = "") -> Callable[[type[C]], type[C]]:
    """Class decorator, written under ``@dataclass``: give the class ``source``'s fields ``names``.

    Each added field has the source field's type (a nested dataclass stays its own type), default (or default
    factory; none: required) and metadata, help text included, and records ``source`` under
    :data:`BORROWED_FROM` so :func:`borrowed` can hand the values back. The added fields follow the class's own
    fields, in ``names`` order, and are keyword-only (so a required one may follow fields with defaults).
    ``--help`` lists them under ``heading`` (default: the source's name).
    A name the class declares itself, or that ``source`` lacks, is a ``TypeError`` at import.
    """
    source_fields = {f.name: f for f in dataclasses.fields(source)}
    unknown = [name for name in names if name not in source_fields]
    if unknown:
        raise TypeError(f"{source.__name__} has no field(s) {', '.join(unknown)}")
    # resolved types, not the source module's annotation strings: the class's module need not import them
    hints = typing.get_type_hints(source)

    def add_fields(cls: type[C]) -> type[C]:
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name in names:
            if name in annotations:
                raise TypeError(f"{cls.__name__}.{name} is declared in the class and taken from {source.__name__}")
            taken = source_fields[name]
            annotations[name] = hints[name]
            setattr(cls, name, dataclasses.field(default=taken.default, default_factory=taken.default_factory,
                                                 metadata={**taken.metadata, BORROWED_FROM: source,
                                                           HEADING: heading or f"settings of {source.__name__}"},
                                                 kw_only=True))
        cls.__annotations__ = annotations
        return cls

    return add_fields


def borrowed(config: Any, source: type) -> dict[str, Any]:
    """The values of ``config``'s fields taken from ``source`` by :func:`fields_from`, by name (ready to pass
    to ``source(...)``)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get(BORROWED_FROM) is source}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, "", argparse.SUPPRESS) or action.dest == "help":
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a one-line :class:`UserError`, not usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see --help)")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def is_nested_config(tp: Any) -> bool:
    """True for a field type that is itself a config dataclass (its fields are nested keys)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` (a string from the CLI, or a YAML scalar) to the field type ``tp``.

    A nested config dataclass takes an instance of itself or a mapping of its keys. ``where`` names the key and
    its source for the error message.
    """
    if is_nested_config(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, source=where)
        raise UserError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, "
                        f"got {value!r}")
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"{where}: a value is required")
    origin = typing.get_origin(tp)
    try:
        if origin is Literal:
            choices = typing.get_args(tp)
            for choice in choices:
                if value == choice or str(value) == str(choice):
                    return choice
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        if origin is tuple:
            (item_type, _) = typing.get_args(tp)
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(coerce(item_type, item.strip() if isinstance(item, str) else item, where)
                         for item in items if not (isinstance(item, str) and not item.strip()))
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return _within_64_bits(int(value), where)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return _finite(float(value), where)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise UserError(f"{where}: expected {name}, got {value!r}") from None
    raise TypeError(f"unsupported config field type {tp!r}")


def _finite(value: float, where: str) -> float:
    """NaN and infinities pass every comparison a range check makes (or fail it far from the flag): refuse them."""
    if not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value}")
    return value


def _within_64_bits(value: int, where: str) -> int:
    if not -(2**63) <= value < 2**63:
        raise UserError(f"{where}: {value} does not fit in 64 bits")
    return value


# Upper bounds of numeric settings, by field name, that every config's check_ranges applies to the fields it
# checks: far above any real run, low enough that a typo (1e9, an extra digit) stops at parse time instead of
# in a worker a minute later. Seeds go to numpy and torch generators, which take 32 bits.
UPPER_BOUNDS: dict[str, float] = {
    "seed": 2**32 - 1, "epochs": 10_000, "warmup_epochs": 10_000, "patience": 10_000, "batch_size": 65_536,
    "image_size": 1024, "embedding_dim": 8192, "num_workers": 1024, "num_actors": 1024, "max_failures": 1000,
    "lr": 10.0, "weight_decay": 10.0, "margin": 4.0, "train_per_class": 10_000_000, "val_per_class": 10_000_000,
    "num_samples": 10_000, "max_concurrent": 10_000, "grace_period": 10_000, "grid_queries": 1000,
    "grid_k": 1000, "tsne_points": 10_000_000, "csv_rows": 100_000_000,
}


# Units a size setting (--cache-budget 512MB) may use: powers of 1024, as memory is counted.
SIZE_UNITS: dict[str, int] = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40,
                              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20,
                              "G": 2**30, "T": 2**40}
SIZE_LIMIT = 2**60  # far above any machine's memory: a size above it is a typo


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size setting such as ``512MB``, ``4GB``, ``1.5GiB`` or ``0`` (KB/MB/GB/TB count in powers of
    1024, like memory); anything else is one :class:`UserError` naming ``flag`` and showing what it takes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise UserError(f"{flag} must be a size such as 512MB, 4GB or 0, got {text!r}")
    value = float(match.group(1)) * SIZE_UNITS[unit]
    if value > SIZE_LIMIT:
        raise UserError(f"{flag} must be at most 1 EB, got {text!r}")
    return int(value)


def format_size(size: float) -> str:
    """``size`` bytes as a person reads them, in the units :func:`parse_size` takes: ``3.1 MB``, ``512 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_upper_bound(name: str, value: float | None, bounds: Mapping[str, float] = UPPER_BOUNDS) -> None:
    """A one-line :class:`UserError` naming the flag when ``value`` is above ``name``'s bound (if it has one)."""
    if value is not None and name in bounds and value > bounds[name]:
        bound = bounds[name]
        shown = int(bound) if float(bound).is_integer() else bound
        raise UserError(f"--{name.replace('_', '-')} must be at most {shown}, got {value}")


def check_ranges(config: Any, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                 at_most: Mapping[str, float] | None = None) -> None:
    """Raise a one-line :class:`UserError` naming the flag when a numeric field is out of range
    (``None`` = "from the preset", not checked): below its lower bound, or above :data:`UPPER_BOUNDS` (or
    ``at_most``, the config's own bounds)."""
    for names, bad, wanted in ((positive, lambda v: v <= 0, "positive"), (non_negative, lambda v: v < 0, "0 or more")):
        for name in names:
            value = getattr(config, name)
            if value is not None and bad(value):
                raise UserError(f"--{name.replace('_', '-')} must be {wanted}, got {value}")
    for name in (*positive, *non_negative, *(at_most or {})):
        check_upper_bound(name, getattr(config, name), {**UPPER_BOUNDS, **(at_most or {})})


def from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build config ``cls`` from a plain dict, rejecting unknown keys and coercing types.

    Used for YAML files and, inside Ray workers, to rebuild a config from ``train_loop_config``.
    Keys may use ``-`` or ``_``.
    """
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in fields:
            raise UserError(f"unknown key {raw_key!r} in {source} (valid keys: {', '.join(fields)})")
        kwargs[key] = coerce(hints[key], value, f"key {raw_key!r} in {source}")
    missing = [name for name, f in fields.items()
               if name not in kwargs and f.default is _MISSING and f.default_factory is _MISSING]
    if missing:
        raise UserError(f"{source}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON/YAML-friendly dict (tuples become lists, a nested config a nested dict)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value

    return plain(dataclasses.asdict(config))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a :class:`UserError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"config file is not valid YAML: {path}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file must hold a mapping of keys to values: {path}")
    return data


def build_parser(cls: type, prog: str, description: str | None = None,
                 modes: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``cls`` plus ``--config``, ``--verbose`` and the switches
    ``modes`` names (name -> help: how the job runs, not what it computes, so never a config field)."""
    parser = _Parser(prog=prog, description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
                     formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of defaults (keys = the flags below); flags override it")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own log lines on the terminal too (they always go to the job's log file)")
    for name, text in (modes or {}).items():
        parser.add_argument("--" + name.replace("_", "-"), dest=f"mode:{name}", action="store_true", help=text)
    hints = _field_types(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}  # fields_from's fields, under their heading
    for f in dataclasses.fields(cls):
        if is_nested_config(hints[f.name]):
            _add_nested_flags(parser, f, hints[f.name])
            continue
        heading = f.metadata.get(HEADING)
        target = parser if heading is None else groups.get(heading) or groups.setdefault(
            heading, parser.add_argument_group(heading))
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _unwrap_optional(hints[f.name])
        required = f.default is _MISSING and f.default_factory is _MISSING
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str  # coerced afterwards so CLI and YAML share one set of rules
            if typing.get_origin(tp) is Literal:
                kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(tp))) + "}"
            elif typing.get_origin(tp) is tuple:
                kwargs["metavar"] = "A,B,..."
            else:
                kwargs["metavar"] = f.name.upper()
        if f.metadata.get("positional"):
            if typing.get_origin(tp) is not tuple:
                raise TypeError(f"positional field {f.name} must be a tuple")
            parser.add_argument(f.name, nargs="+" if required else "*", type=str, metavar=f.name.rstrip("s").upper(),
                                help=kwargs["help"])
            continue
        if required:
            kwargs["help"] += " (required)"
        else:
            kwargs["default"] = f.default if f.default is not _MISSING else f.default_factory()
        target.add_argument(flag, **kwargs)
    return parser


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not _MISSING else f.default_factory()


def _add_nested_flags(parser: argparse.ArgumentParser, outer: dataclasses.Field, tp: type) -> None:
    """Flags ``--<outer>-<inner>`` for the fields of nested config ``tp``; their dest is ``outer.inner``."""
    defaults = _default(outer)
    group = parser.add_argument_group(outer.name.replace("_", "-"), outer.metadata.get("help") or None)
    inner_hints = _field_types(tp)
    for inner in dataclasses.fields(tp):
        inner_tp, _ = _unwrap_optional(inner_hints[inner.name])
        kwargs: dict[str, Any] = {"dest": f"{outer.name}.{inner.name}", "help": inner.metadata.get("help", ""),
                                  "default": getattr(defaults, inner.name)}
        if inner_tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str
            kwargs["metavar"] = ("{" + ",".join(map(str, typing.get_args(inner_tp))) + "}"
                                 if typing.get_origin(inner_tp) is Literal else inner.name.upper())
        group.add_argument(f"--{outer.name}-{inner.name}".replace("_", "-"), **kwargs)


def parse_config(cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None) -> C:
    """Parse ``argv`` into ``cls``: dataclass defaults < ``--config`` YAML < flags."""
    return parse_job_command_line(cls, argv, prog)[0]


def parse_job_command_line(cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None,
                           modes: dict[str, str] | None = None) -> tuple[C, dict[str, bool]]:
    """:func:`parse_config`, with the switches ``modes`` names (:func:`build_parser`) as well: returns the config
    and each switch's value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or cls.__name__
    pre = _Parser(prog=prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    file_values = {}
    if known.config:
        raw = load_yaml(known.config)
        source = f"config file {known.config}"
        hints = _field_types(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for raw_key, value in raw.items():
            key = str(raw_key).replace("-", "_")
            if key not in names:
                raise UserError(f"unknown key {raw_key!r} in {source} (valid keys: {', '.join(sorted(names))})")
            file_values[key] = coerce(hints[key], value, f"key {raw_key!r} in {source}")
    parser = build_parser(cls, prog, modes=modes)
    for action in parser._actions:
        outer, _, inner = action.dest.partition(".")
        if inner and outer in file_values:  # a nested key: the YAML mapping's value is the flag's default
            action.default = getattr(file_values[outer], inner)
        elif action.dest in file_values:
            action.default = file_values[action.dest]
            action.required = False
    # Enforce "required" ourselves, so a value given in the YAML file satisfies it.
    namespace = parser.parse_args(argv)
    values, nested, switches = {}, {}, {}
    for key, value in vars(namespace).items():
        outer, _, inner = key.partition(".")
        if key.startswith("mode:"):
            switches[key.removeprefix("mode:")] = bool(value)
        elif inner:
            nested.setdefault(outer, {})[inner] = value
        elif key not in ("config", "verbose"):
            values[key] = value
    missing = [f"--{k.replace('_', '-')}" for k, v in values.items() if v is None and _is_required(cls, k)]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)} (see --help)")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if value is None and _is_required(cls, key):
            continue
        kwargs[key] = coerce(hints[key], value, f"--{key.replace('_', '-')}")
    for outer, inner_values in nested.items():
        inner_hints = _field_types(hints[outer])
        kwargs[outer] = hints[outer](**{
            inner: coerce(inner_hints[inner], value, f"--{outer}-{inner}".replace("_", "-"))
            for inner, value in inner_values.items()})
    return cls(**kwargs), switches


def _is_required(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is _MISSING and f.default_factory is _MISSING
