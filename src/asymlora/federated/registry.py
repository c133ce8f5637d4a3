"""The registry of federated methods: name -> class. Adding a method is one file defining a
:class:`FederatedMethod` subclass plus one line in ``METHODS``; the CLI's choices, the config's
checks and every message naming methods are read from here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from .base import FederatedMethod
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
DEFAULT = "fedalora"  # the paper's method, what a config without federation.method runs
BASELINE = "fedit"  # the reference of comparisons: plain LoRA, federated by averaging


def get_method(name: str, **options: object) -> FederatedMethod:
    """The method called ``name`` with its options (``reset_a_each_round``, ``dense_download``)."""
    if name not in METHODS:
        raise ValueError(f"unknown federated method {name!r}; known: {known()}")
    return METHODS[name](**options)


def known(names: Sequence[str] | None = None) -> str:
    """``"fedit, ffa, ..."``: every registered method, or the given ones, for messages."""
    return ", ".join(METHODS if names is None else names)


def heterogeneous() -> list[str]:
    """The methods that accept clients of different ranks."""
    return [name for name, cls in METHODS.items() if cls.heterogeneous]


def averaging() -> list[str]:
    """The methods whose server step is the weighted average of the uploads (``not_an_average``
    is None): those Flower's DP wrappers and robust aggregation compose with."""
    return [name for name, cls in METHODS.items() if cls.not_an_average is None]


def options_of(name: str) -> set[str]:
    """The options (dataclass fields) the method ``name`` takes."""
    return {f.name for f in fields(METHODS[name])}


def rank_problem(name: str, ranks: Sequence[int]) -> str | None:
    """Why clients of ``ranks`` cannot run method ``name``, or None."""
    if METHODS[name].heterogeneous or len(set(ranks)) <= 1:
        return None
    return (
        f"{name} needs every client at the same rank, got ranks {list(ranks)}; "
        f"use a heterogeneous method ({known(heterogeneous())})"
    )
