"""asymlora: fine-tune LLMs with several LoRA adapters at once (ALoRA, Fed-ALoRA and their peers)."""

from .adapters import (
    AdapterConfig,
    AsymLoraModel,
    MultiLoraLinear,
    export_peft,
    load_adapter,
    save_adapter,
    wrap,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AsymLoraModel",
    "MultiLoraLinear",
    "__version__",
    "export_peft",
    "load_adapter",
    "save_adapter",
    "wrap",
]
