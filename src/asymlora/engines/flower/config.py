"""Flower's run config -> ``asymlora federate``'s config.

The run config's keys are the config's own dotted paths, as Flower apps declare them under
``[tool.flwr.app.config]`` (``federation.method``, ``adapter.ranks``, ``train.steps``, ...), and
Flower hands them over flat; each becomes one typed ``(path, value)`` override. ``""`` leaves
a field at the config file's value or the recipe's default (TOML has no null); a list field
takes a comma-separated string (``adapter.ranks = "4,2,2,2"``). Keys with a hyphen are the
app's own settings, not config fields: ``num-threads``, ``timeout-s``, ``save-adapters``; and
``config`` names a YAML/TOML file read before the keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...config import Override, field_type, is_list_type, parse_value
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
    waits for replies, and whether the nodes save their adapters at the end."""

    num_threads: int = 0
    timeout_s: float = 600.0
    save_adapters: bool = True

    @classmethod
    def of(cls, run_config: Mapping[str, Any]) -> AppSettings:
        return cls(
            int(run_config.get("num-threads", 0)),
            float(run_config.get("timeout-s", 600)),
            bool(run_config.get("save-adapters", True)),
        )
