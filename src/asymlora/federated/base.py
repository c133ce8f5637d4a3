"""The contract every federated method fulfils, on dicts of named tensors only.

One round, for the clients that take part (any engine: the in-process simulator or Flower)::

    server, states = method.setup(states)                # once, before round 1
    inits = [dict(s) for s in states]                    # each client remembers its round-0 state
    for round in rounds:
        train each client i, updating only the keys where method.trainable(key)
        uploads = [method.upload(s) for s in states]      # what goes up
        server, downloads = method.aggregate(uploads, n_examples, server, scales)
        states = [method.apply_download(s, d, init) for s, d, init in zip(states, downloads, inits)]

Per adapted module a method declares, by part name (``lora_A``, ``lora_B``, ...):
``trains`` (what the client's optimiser updates), ``uploads`` (what it sends), ``local`` (what
never leaves the client). ``aggregate`` is how the server combines the uploads and what goes
back down; ``apply_download`` is what the client does with it. ``comm_per_module`` states the
paper's count of parameters sent per module per client per round, and tests check that it equals
what ``upload`` and ``aggregate`` really put in their dicts.

Methods hold no tensors: the server's state is a dict passed in and returned, and a client's
round-0 state (``init``) is kept by the client, which lets methods that restart adapters each
round (FLoRA, and the reference's A reset) do so without randomness of their own.

Clients that sit out a round simply get no download that round (the paper runs with all
clients in every round).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .common import (
    Tensors,
    broadcast,
    client_scales,
    example_weights,
    lora_shapes,
    part,
    same_keys,
    select,
    weighted_average,
)


@dataclass(frozen=True)
class FederatedMethod(ABC):
    """Base class: subclasses set the class attributes and implement the three abstract methods."""

    name: ClassVar[str]
    heterogeneous: ClassVar[bool]  # accepts clients of different ranks
    trains: ClassVar[frozenset[str]]  # parts the client's optimiser updates; the rest is frozen
    uploads: ClassVar[frozenset[str]]  # parts sent to the server each round
    local: ClassVar[frozenset[str]]  # parts that never leave the client
    shared_init: ClassVar[frozenset[str]] = frozenset()  # parts made identical across clients by setup

    def trainable(self, key: str) -> bool:
        """Whether the client trains the tensor ``key`` (``"<module>.lora_B"``)."""
        return part(key) in self.trains

    def upload(self, state: Mapping[str, Tensor]) -> Tensors:
        """What a client sends after local training: its tensors whose part is in ``uploads``."""
        return select(state, self.uploads)

    def setup(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[Tensors, list[Tensors]]:
        """Round 0: the common starting point, sent once (not counted per round).

        Default: every client gets client 0's tensors for the parts in ``shared_init``; the
        server starts with an empty state.
        """
        return {}, broadcast(states, self.shared_init)

    def aggregate(
        self,
        uploads: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float],
        server: Mapping[str, Tensor],
        scales: Sequence[float] | None = None,
    ) -> tuple[Tensors, list[Tensors]]:
        """Combine the uploads into the new server state and one download per uploading client.

        ``weights``: the clients' example counts (normalised here to p_i). ``scales``: each
        client's LoRA scale s_i = alpha_i / r_i (1.0 if omitted); only methods that form the
        products s_i B_i A_i use it. Checks the inputs once, then calls the method's ``combine``.
        """
        p = example_weights(weights, len(uploads))
        same_keys(uploads)
        return self.combine(uploads, p, client_scales(scales, len(uploads)), server)

    @abstractmethod
    def combine(
        self,
        uploads: Sequence[Mapping[str, Tensor]],
        p: list[float],
        s: list[float],
        server: Mapping[str, Tensor],
    ) -> tuple[Tensors, list[Tensors]]:
        """The method's server step: uploads holding the same keys, normalised weights p_i, scales s_i."""

    @abstractmethod
    def apply_download(
        self,
        state: Mapping[str, Tensor],
        download: Mapping[str, Tensor],
        init: Mapping[str, Tensor],
    ) -> Tensors:
        """The client's state for the next round, from its state, the download and its round-0 state."""

    @abstractmethod
    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        """(params up, params down) at one module for a client of rank ``rank`` in one round,
        when the round's participants have ranks ``ranks``."""

    def state_shapes(self, d_in: int, d_out: int, rank: int, d_m: int) -> dict[str, tuple[int, ...]]:
        """The client's tensors at one module, part -> shape (plain LoRA unless overridden)."""
        return lora_shapes(d_in, d_out, rank, d_m)


@dataclass(frozen=True)
class AverageUploads(FederatedMethod):
    """Methods whose server takes the weighted average sum_i p_i of each uploaded tensor and
    sends it back to every client, which overwrites its own copy (FedIT, FFA, FedSA, Fed-ALoRA:
    they differ only in which parts they train, upload and keep)."""

    def combine(
        self,
        uploads: Sequence[Mapping[str, Tensor]],
        p: list[float],
        s: list[float],
        server: Mapping[str, Tensor],
    ) -> tuple[Tensors, list[Tensors]]:
        avg = weighted_average(uploads, p)
        return avg, [avg] * len(uploads)

    def apply_download(
        self, state: Mapping[str, Tensor], download: Mapping[str, Tensor], init: Mapping[str, Tensor]
    ) -> Tensors:
        # Copies: clients must not share storage with each other or with the server's state.
        return {**state, **{k: v.clone() for k, v in download.items()}}
