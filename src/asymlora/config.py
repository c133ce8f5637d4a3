"""Typed configuration, validated once where it enters (files and flags).

A run is described by nested dataclasses; a TOML or YAML file gives any subset of their fields,
``--set section.key=value`` flags override them, and the resolved result is written to the run
folder. Unknown keys, wrong types and impossible combinations are refused at start with a message
that names the key.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError, MissingFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")

MAX_CONFIG_NODES = 100_000  # values in a config file, every YAML alias counted as often as it is used
INT_RANGE = (-(2**63), 2**63)  # what torch and numpy take (seeds, sizes)


class ConfigError(InputError):
    """A configuration value that cannot be used; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, key)
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected nothing (null), got {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table/mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT_RANGE[0] <= value < INT_RANGE[1]:
                raise ConfigError(f"{key}: {value} is out of range (a 64-bit integer)")
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(f"{key}: {value!r} is too large for a float") from None
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    where = prefix or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table/mapping, got {data!r}")
    not_str = [k for k in data if not isinstance(k, str)]
    if not_str:
        raise ConfigError(f"{where}: keys must be strings, got {not_str[0]!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {', '.join(f'{prefix}.{k}' if prefix else k for k in unknown)}; "
            f"known keys{' in ' + prefix if prefix else ''}: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def read_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) or JSON config file into a dict.

    Refused with a ``ConfigError``: a missing, unreadable, binary or empty file, one that does
    not parse, and a YAML file whose aliases expand past ``MAX_CONFIG_NODES`` values or refer to
    themselves (a "billion laughs" would otherwise fill the memory when the config is copied)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: use .toml, .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=unique_keys)
        else:
            data = _load_yaml(text)
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}", err.hint) from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except Exception as err:  # the parsers' own errors (yaml.YAMLError, RecursionError, ...)
        raise ConfigError(f"config file {path} is not valid: {err}") from None
    if data is None or data == {}:
        raise ConfigError(
            f"config file {path} is empty", hint="give at least one setting, or leave out --config"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def read_json(path: str | Path) -> Any:
    """A JSON file a user gave or a run folder holds: a missing one is a ``MissingFileError``,
    one that is not JSON (or not UTF-8 text, or nested past the parser's depth) an ``InputError``
    naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file not found") from None
    except ConfigError as err:
        raise InputError(f"{path}: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise InputError(f"{path}: not valid JSON ({str(err)[:200]})") from None


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key given twice (the parser would keep the last
    one silently)."""
    twice = first_repeated(key for key, _ in pairs)
    if twice is not None:
        raise ConfigError(f"key {twice!r} is given twice in one object; keep one")
    return dict(pairs)


def first_repeated(items: Iterable[Any]) -> Any:
    """The first item that comes again in ``items``, or None."""
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, after checking the document's size with every alias expanded."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            expanded_size(node)
            check_unique_yaml_keys(node)
            return node

    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_unique_yaml_keys(root: Any) -> None:
    """Refuse a YAML mapping that gives one key twice (PyYAML keeps the last one silently). Each
    node is visited once (aliases share nodes; ``expanded_size`` has refused cycles)."""
    import yaml

    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = (k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.value != "<<")
            twice = first_repeated(keys)
            if twice is not None:
                line = node.start_mark.line + 1
                raise ConfigError(f"line {line}: key {twice!r} is given twice in one mapping; keep one")
        stack.extend(_children(node))


def expanded_size(root: Any) -> int:
    """The number of values in a YAML node graph once every alias is expanded, counted without
    expanding anything (each node's size once, from its children's); a ``ConfigError`` past
    ``MAX_CONFIG_NODES`` or where an alias refers to a node that holds it."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _children(node)
        if children_done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_CONFIG_NODES:
                raise ConfigError(
                    f"its aliases expand to more than {MAX_CONFIG_NODES:,} values; not a config",
                    hint="write the values out, or use fewer nested aliases",
                )
            continue
        if id(node) in on_path:
            raise ConfigError("an alias refers to a value that contains it (a cycle); not a config")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: Any) -> list[Any]:
    value = getattr(node, "value", None)
    if not isinstance(value, list):
        return []  # a scalar
    return [part for item in value for part in (item if isinstance(item, tuple) else (item,))]


Override = tuple[tuple[str, ...], Any]  # (("train", "lr"), 0.0003): a field's path and its value


def parse_override(text: str) -> Override:
    """``train.lr=3e-4`` -> (("train", "lr"), 0.0003); values are read as TOML, else as strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: write it as section.key=value")
    try:
        return tuple(key.strip().split(".")), parse_value(raw)
    except RecursionError:
        raise ConfigError(f"override {text!r}: nested too deeply") from None


def parse_value(raw: str) -> Any:
    """A value as TOML reads it (``3e-4``, ``[1, 2]``, ``true``, ``'a'``), else the text itself."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: Sequence[str | Override]) -> dict[str, Any]:
    """``data`` with each override set: a typed ``(path, value)`` pair, or ``section.key=value``
    text from a user (parsed here, once)."""
    data = copy.deepcopy(data)  # keeps shared values shared (read_file bounds their expansion)
    for item in overrides:
        path, value = parse_override(item) if isinstance(item, str) else item
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node[path[-1]] = value
    return data


def field_type(cls: type, path: Sequence[str]) -> Any:
    """The annotation of the field at ``path`` of dataclass ``cls`` (None when there is none)."""
    tp: Any = cls
    for name in path:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if name not in hints:
            return None
        tp = hints[name]
    return tp


def is_list_type(tp: Any) -> bool:
    """Whether the annotation ``tp`` is a list, or a union holding one (``list[int] | None``)."""
    if typing.get_origin(tp) is list:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(
        is_list_type(option) for option in typing.get_args(tp)
    )


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values in ``top`` win."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
