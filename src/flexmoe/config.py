"""Configuration: dataclasses of options, filled from a TOML/YAML file plus `--set key=value`.

Every command that produces an artefact writes its fully resolved configuration next to it, so a
run can be reproduced from its directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says how to fix it."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json, e.g. a run's resolved config) file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                f"unknown config format {path.suffix!r} for {path}: use .toml, .yaml or .json"
            )
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot parse {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table/mapping of options, not {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, lists), else keep the string.

    YAML 1.1 reads `1e-3` (no dot) as a string; such numbers are floats here.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (dotted keys descend into nested tables) to a copy of `data`."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. --set lr=1e-4)"
            )
        *parents, leaf = [k.strip().replace("-", "_") for k in key.split(".")]
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {parent!r} is a value, not a table")
        node[leaf] = parse_value(value)
    return data


def build(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses.

    Unknown keys and values of the wrong type are `ConfigError`s naming the option, so a typo in
    a file or `--set` fails before any work starts, not deep inside a run.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown option(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            value = build(hints[name], value, where=f"{where}.{name}")
        else:
            value = _coerce(value, hints[name], f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against a field's type hint (ints are floats too; a string is a
    comma-separated list where a list is expected, as in `--set eval.metrics=rouge,ppl`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be one of {hint}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where} must be empty, got {value!r}")
    if origin is tuple:
        items = (
            [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        )
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(item, item_type, where) for item in items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table of key = value, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """The one way commands get their options: defaults < config file < `--set` overrides."""
    data = read_config_file(path) if path else {}
    return build(cls, apply_overrides(data, overrides or []))
