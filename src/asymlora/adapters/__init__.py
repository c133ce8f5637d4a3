"""The adapter core: one layer for LoRA / ALoRA / HydraLoRA / MoLA, injection, save/load, export."""

from .config import METHODS, ROUTERS, AdapterConfig
from .io import export_peft, load_adapter, read_tensors, save_adapter
from .layer import AdapterLayer, FactoredLoraLinear, MultiLoraLinear
from .model import AsymLoraModel, ParameterCount, wrap
from .targets import find_target_modules

__all__ = [
    "METHODS",
    "ROUTERS",
    "AdapterConfig",
    "AdapterLayer",
    "FactoredLoraLinear",
    "AsymLoraModel",
    "MultiLoraLinear",
    "ParameterCount",
    "export_peft",
    "find_target_modules",
    "load_adapter",
    "read_tensors",
    "save_adapter",
    "wrap",
]
