"""Federated fine-tuning methods, one file each, as plain functions on dicts of named tensors.

``METHODS`` maps a method's name to its class; ``get_method("fedalora")`` builds one. Adding a
method is one file defining a :class:`FederatedMethod` subclass plus one line here. See
``base.py`` for the contract and the round loop every engine runs.
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
from .zeropad import ZeroPad

METHODS: dict[str, type[FederatedMethod]] = {
    "fedit": FedIT,
    "ffa": FFALoRA,
    "fedsa": FedSALoRA,
    "fedalora": FedALoRA,
    "zeropad": ZeroPad,
    "flora": FLoRA,
    "flexlora": FlexLoRA,
    "fedalora-het": FedALoRAHet,
}


def get_method(name: str, **options: object) -> FederatedMethod:
    """The method called ``name`` with its options (``reset_a_each_round``, ``dense_download``)."""
    if name not in METHODS:
        raise ValueError(f"unknown federated method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = [
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
