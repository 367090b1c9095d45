"""One source of defaults per stage: frozen dataclasses, overridable by a YAML file and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from imgsim.errors import ImgsimError

C = TypeVar("C")
# How a setting left to be chosen (None in its dataclass) is spelt in flags, YAML, -P and --help.
AUTO = "auto"


# The concerns settings are grouped by in --help, in this order.
GROUPS = ("data", "model", "optimisation", "augmentation", "selection", "index", "evaluation", "gallery",
          "compute", "tracking", "distributed",
          # the server's and the page's
          "page", "loading", "answers", "limits", "graph")


def setting(default: Any, help: str, group: str) -> Any:  # noqa: A002 - the word argparse uses
    """A stage setting declared once: its default, its one-line help and its group. The CLI flag, the
    ``mlflow run -P`` parameter and ``--help`` all come from this declaration."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    return dataclasses.field(default=default, metadata={"help": help, "group": group})


def from_sources(cls: type[C], prefix: str, params: dict[str, Any] | None = None, what: str = "setting") -> C:
    """A long-running process's settings (the server, the page): ``params`` (constructor parameters) win over
    ``<prefix><NAME>`` environment variables, which win over the defaults; "" and None mean "not given".
    Converted and validated as every stage's settings are (:func:`resolve`)."""
    params = dict(params or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ImgsimError(f"unknown {what}(s) {unknown}; valid: {sorted(names)}")
    values: dict[str, Any] = {}
    for name in names:
        raw = params.get(name)
        if raw is None or raw == "":
            raw = os.environ.get(env_name(prefix, name))
        if raw is not None and raw != "":
            values[name] = raw
    return resolve(cls, None, values)


def env_name(prefix: str, name: str) -> str:
    return f"{prefix}{name.upper()}"


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def group_of(field: dataclasses.Field) -> str:
    return field.metadata.get("group", "")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: frozenset[str] = frozenset(),
                  config_flag: bool = True, title: str = "", shared: dict[str, list[str]] | None = None) -> None:
    """Add ``--field`` for every dataclass field (default None = not given: the file or the default decides),
    in one argument group per concern, and ``--config``. ``--field_name`` works too: `mlflow run -P
    field_name=value` passes parameters an entry point does not declare that way, which is how every setting
    reaches a stage without masking the file. ``title`` prefixes the groups' titles (``main`` lists each
    stage's); ``shared`` names the stages a flag also sets, for its help."""
    if config_flag:
        parser.add_argument("--config", default=None, help="YAML file whose keys override this stage's defaults")
    groups: dict[str, argparse._ArgumentGroup] = {}
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    for field in sorted(fields, key=lambda f: GROUPS.index(group_of(f)) if group_of(f) in GROUPS else len(GROUPS)):
        name = group_of(field) or "other"
        if name not in groups:
            groups[name] = parser.add_argument_group(f"{title}: {name}" if title else name)
        flags = ["--" + field.name.replace("_", "-")]
        if "_" in field.name:  # what `mlflow run -P` passes; one spelling in --help is enough
            groups[name].add_argument("--" + field.name, dest=field.name, default=None, help=argparse.SUPPRESS,
                                      **({"nargs": "?", "const": "true"} if _base_type(cls, field.name) is bool else {}))
        text = help_of(field).replace("%", "%%")  # argparse formats help with %
        if shared and field.name in shared:
            text += f" [sets it for {', '.join(shared[field.name])}]"
        if _base_type(cls, field.name) is bool:
            groups[name].add_argument(*flags, dest=field.name, default=None, nargs="?", const="true", metavar="BOOL",
                                      help=f"{text} (true/false, the flag alone means true; default: "
                                           f"{show(field.default)})")
        else:
            groups[name].add_argument(*flags, dest=field.name, default=None, metavar=field.name.upper(),
                                      help=f"{text} (default: {show(field.default) or 'empty'})")


def resolve(cls: type[C], config_file: str | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults < YAML file < overrides; values given as strings are converted to the field's type."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(read_yaml(config_file))
    values.update(given(overrides or {}))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ImgsimError(f"unknown setting(s) {unknown} for {cls.__name__}; valid ones: {sorted(names)}")
    try:
        return cls(**{k: _convert(v, _base_type(cls, k), k, is_auto(cls, k)) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise ImgsimError(f"invalid {cls.__name__}: {exc}") from None


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The settings a user actually passed: None means "not given"."""
    return {k: v for k, v in values.items() if v is not None}


def from_namespace(cls: type[C], ns: argparse.Namespace) -> C:
    """Build a config from parsed arguments made by :func:`add_arguments`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return resolve(cls, ns.config, {k: v for k, v in vars(ns).items() if k in names})


def to_params(cfg: Any) -> dict[str, str]:
    """Flat string params for MLflow."""
    return {k: show(v) for k, v in dataclasses.asdict(cfg).items()}


def read_yaml(path: str) -> dict:
    """A YAML mapping from ``path``, with a clear error for anything else."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ImgsimError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ImgsimError(f"config file {path} must hold a mapping of setting: value")
    return data


def _base_type(cls: type, name: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    if _optional(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def is_auto(cls: type, name: str) -> bool:
    """Whether the setting may be left ``auto`` (None): its type is ``X | None``."""
    return _optional(typing.get_type_hints(cls)[name])


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _convert(value: Any, kind: Any, name: str, auto: bool = False) -> Any:
    if auto and (value is None or (isinstance(value, str) and value.strip().lower() == AUTO)):
        return None
    if kind is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        parsed = [_number(str(x).strip()) for x in items if str(x).strip()]
        return tuple(parsed)
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if kind is int and isinstance(value, (str, float)) and not isinstance(value, bool):
        # MLflow has no integer parameter type, so whole numbers may arrive as "12" or "12.0".
        number = float(value) if _is_number(value) else None
        if number is None or not number.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    if kind in (int, float, str) and not isinstance(value, kind):
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name} must be {kind.__name__}, got {value!r}") from None
    return value


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def show(value: Any) -> str:
    if value is None:
        return AUTO
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
