"""YAML recipe + `section.field=value` overrides → a type-checked `Config`; and back to YAML.

Every error is one line that names the field: `config error: optim.lr='fast' must be a float`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import types
import typing
from typing import Any

import yaml

from megatron_mmpl.config.schema import Config
from megatron_mmpl.storage.atomic import atomic_write


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the field."""

    def __init__(self, msg: str):
        super().__init__(f"config error: {msg}")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or start from defaults), apply `a.b=value` overrides, return a checked Config."""
    raw = _read_recipe(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        _set_path(raw, key.strip(), _parse_scalar(value))
    return from_dict(raw)


def _read_recipe(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A recipe's mapping; `base: other.yaml` (relative to this file) is read first and this file's values
    override it, section by section (an ablation arm states only what differs from the main recipe)."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe {path!r} does not exist")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"recipe {path!r}: its `base:` chain comes back to itself")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_recipe(os.path.join(os.path.dirname(path), base), (*seen, os.path.abspath(path)))
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def from_dict(raw: dict, cls: type = Config, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(value or {}, typ, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, typ)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str | None = None) -> str:
    """The resolved config as YAML; also written to `path` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, text)
    return text


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """`section.field` → the docstring written under that field in schema.py."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            name = stmt.target.id
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[prefix + name] = " ".join(str(nxt.value.value).split())
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            docs[prefix + f.name] = " ".join((typ.__doc__ or "").split())
            docs.update(field_docs(typ, f"{prefix}{f.name}."))
    return docs


def _parse_scalar(text: str) -> Any:
    """Override values are YAML scalars: `1e-5`, `true`, `null`, `[1, 2]`, `{a: 1}`, or a bare string."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_path(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _check_type(name: str, value: Any, typ: Any) -> Any:
    """Return `value` as `typ` (ints accepted for floats; YAML's 1e-5 string form accepted for floats)."""
    if typ is Any:
        return value
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is dict:
        kt, vt = typing.get_args(typ)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} must be a mapping")
        return {_check_type(f"{name}.<key>", k, kt): _check_type(f"{name}.{k}", v, vt) for k, v in value.items()}
    if origin is list:
        (vt,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r} must be a list")
        return [_check_type(f"{name}[{i}]", v, vt) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} must be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}={value!r} must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads `1e-5` (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} must be a number")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}={value!r} must be a string")
    raise TypeError(f"config field {name} has unsupported type {typ}")
