"""asymlora: fine-tune LLMs with several LoRA adapters at once (ALoRA, Fed-ALoRA and their peers).

The adapter core is re-exported here; tasks, evaluation, federated methods and recipes live in
``asymlora.data``, ``asymlora.eval``, ``asymlora.federated`` and ``asymlora.recipes``."""

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
from .train import Example, TrainConfig, train

__version__ = "0.1.0"

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
    "train",
    "wrap",
]
