"""Federated fine-tuning methods, one file each, as plain functions on dicts of named tensors.

``METHODS`` (``registry.py``) maps a method's name to its class; ``get_method("fedalora")``
builds one. Adding a method is one file defining a :class:`FederatedMethod` subclass plus one
line in the registry. See ``base.py`` for the contract every engine relies on.
"""

from __future__ import annotations

from .base import AverageUploads, FederatedMethod
from .comm import comm_table, count, format_table
from .common import Tensors
from .fedalora import FedALoRA
from .fedalora_het import FedALoRAHet
from .fedit import FedIT
from .fedsa import FedSALoRA
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .registry import BASELINE, METHODS, get_method
from .zeropad import ZeroPad

__all__ = [
    "BASELINE",
    "METHODS",
    "AverageUploads",
    "FLoRA",
    "FFALoRA",
    "FedALoRA",
    "FedALoRAHet",
    "FedIT",
    "FedSALoRA",
    "FederatedMethod",
    "FlexLoRA",
    "Tensors",
    "ZeroPad",
    "comm_table",
    "count",
    "format_table",
    "get_method",
]
