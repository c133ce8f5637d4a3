"""Flower's run config -> ``asymlora federate``'s config.

The run config's keys are the config's own dotted paths, as Flower apps declare them under
``[tool.flwr.app.config]`` (``federation.method``, ``adapter.ranks``, ``train.steps``, ...), and
Flower hands them over flat; each becomes one typed ``(path, value)`` override. ``""`` leaves
a field at the config file's value or the recipe's default (TOML has no null); a list field
takes a comma-separated string (``adapter.ranks = "4,2,2,2"``). Keys with a hyphen are the
app's own settings, not config fields: ``num-threads``, ``timeout-s``, ``save-adapters``,
``overwrite-run``; and ``config`` names a YAML/TOML file read before the keys."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...config import ConfigError, Override, field_type, is_list_type, parse_value
from ...fedconfig import FederatedConfig, load_config

CONFIG_FILE = "config"


def is_app_setting(key: str) -> bool:
    """Whether ``key`` is one of the app's own settings rather than a config field."""
    return key == CONFIG_FILE or "-" in key


def overrides(run_config: Mapping[str, Any]) -> list[Override]:
    """The run config's config fields as typed ``(path, value)`` pairs (``""`` skipped)."""
    out: list[Override] = []
    for key, value in run_config.items():
        if is_app_setting(key) or value == "" or value is None:
            continue
        path = tuple(key.split("."))
        if isinstance(value, str) and is_list_type(field_type(FederatedConfig, path)):
            value = [parse_value(item.strip()) for item in value.split(",") if item.strip()]
        out.append((path, value))
    return out


def federated_config(run_config: Mapping[str, Any]) -> FederatedConfig:
    """The recipe's config: defaults, then the ``config`` file (if any), then the keys."""
    return load_config(run_config.get(CONFIG_FILE) or None, overrides(run_config))


@dataclass(frozen=True)
class AppSettings:
    """The app's own settings: torch threads per task (0: torch's default), how long the server
    waits for replies, whether the nodes save their adapters at the end, and whether a run
    folder that holds a run is started again (a Flower run cannot be resumed)."""

    num_threads: int = 0
    timeout_s: float = 600.0
    save_adapters: bool = True
    overwrite_run: bool = False

    @classmethod
    def of(cls, run_config: Mapping[str, Any]) -> AppSettings:
        settings = cls(
            setting(run_config, "num-threads", 0, int),
            setting(run_config, "timeout-s", 600.0, float),
            setting(run_config, "save-adapters", True, bool),
            setting(run_config, "overwrite-run", False, bool),
        )
        if settings.num_threads < 0 or not 0 < settings.timeout_s < math.inf:
            raise ConfigError(
                f"num-threads={settings.num_threads} must be >= 0 and timeout-s={settings.timeout_s} "
                "a finite number > 0"
            )
        return settings


def setting(run_config: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    """The app setting ``key`` as ``kind`` (bool, int or float), refused when it is not one: a
    flag must be true or false (the text 'false' would be true to ``bool``)."""
    value = run_config.get(key, default)
    accepts, expected = {bool: ((bool,), "true or false"), int: ((int,), "an integer"),
                         float: ((int, float), "a number")}[kind]  # fmt: skip
    if isinstance(value, accepts) and (kind is bool or not isinstance(value, bool)):
        return kind(value)
    raise ConfigError(f"{key}={value!r}: expected {expected}")
