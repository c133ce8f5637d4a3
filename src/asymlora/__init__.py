"""asymlora: fine-tune LLMs with several LoRA adapters at once (ALoRA, Fed-ALoRA and their peers).

The adapter core is re-exported here; tasks, evaluation, federated methods and recipes live in
``asymlora.data``, ``asymlora.eval``, ``asymlora.federated`` and ``asymlora.recipes``.

The names below are imported on first use, so that ``import asymlora`` (and the ``asymlora``
command's ``--help``) does not load torch and transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "AdapterConfig": "adapters",
    "AsymLoraModel": "adapters",
    "FactoredLoraLinear": "adapters",
    "MultiLoraLinear": "adapters",
    "export_peft": "adapters",
    "load_adapter": "adapters",
    "save_adapter": "adapters",
    "wrap": "adapters",
    "load_model": "models",
    "Example": "train",
    "TrainConfig": "train",
}  # the training function is asymlora.train.train (``asymlora.train`` is its subpackage)

__all__ = [
    "AdapterConfig",
    "AsymLoraModel",
    "Example",
    "FactoredLoraLinear",
    "MultiLoraLinear",
    "TrainConfig",
    "__version__",
    "export_peft",
    "load_adapter",
    "load_model",
    "save_adapter",
    "wrap",
]

if TYPE_CHECKING:
    from .adapters import (
        AdapterConfig,
        AsymLoraModel,
        FactoredLoraLinear,
        MultiLoraLinear,
        export_peft,
        load_adapter,
        save_adapter,
        wrap,
    )
    from .models import load_model
    from .train import Example, TrainConfig


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'asymlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
