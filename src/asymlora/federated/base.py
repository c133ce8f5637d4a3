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

Besides the round, a method declares what engines and recipes need to know about it, so that
they never name a method: ``adapter_kind`` (the adapter layer its clients train),
``global_model`` and ``global_adapter`` / ``global_delta`` (what its server state makes for
evaluation), ``combined_adapter`` (a single adapter the whole federation amounts to, if any),
``export_model`` (a client as a plain LoRA) and ``not_an_average`` (why its server step is not
an average of the uploads, which decides whether averaging-only tools such as differential
privacy or a robust mean apply).

Methods hold no tensors: the server's state is a dict passed in and returned, and a client's
round-0 state (``init``) is kept by the client, which lets methods that restart adapters each
round (FLoRA, and the reference's A reset) do so without randomness of their own;
``init_parts`` says which parts of it ``apply_download`` reads (an engine keeps only those).

Clients that sit out a round simply get no download that round (the paper runs with all
clients in every round).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from .common import (
    BASE_DELTA,
    Tensors,
    broadcast,
    client_scales,
    coordinate_median,
    example_weights,
    key_by_key,
    lora_shapes,
    part,
    same_keys,
    select,
    trimmed_mean,
    weighted_average,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..adapters import AdapterConfig, AsymLoraModel


@dataclass(frozen=True)
class FederatedMethod(ABC):
    """Base class: subclasses set the class attributes and implement the three abstract methods."""

    name: ClassVar[str]
    heterogeneous: ClassVar[bool]  # accepts clients of different ranks
    trains: ClassVar[frozenset[str]]  # parts the client's optimiser updates; the rest is frozen
    uploads: ClassVar[frozenset[str]]  # parts sent to the server each round
    local: ClassVar[frozenset[str]]  # parts that never leave the client
    shared_init: ClassVar[frozenset[str]] = frozenset()  # parts made identical across clients by setup
    adapter_kind: ClassVar[str] = "lora"  # the adapter layer (AdapterConfig.method) each client trains
    # What the server state makes, for evaluation: "adapter" (one LoRA every client could hold,
    # ``global_adapter``), "dense" (W0 + ``global_delta``), "base" (W0 + the merged updates of
    # ``base_delta``, adapters off), or None (a trained part stays on each client: only
    # personalised models).
    global_model: ClassVar[str | None] = None
    # Why the server step is not the weighted average of the uploads sent back to every client,
    # or None where it is (then DP noise, clipping and robust means compose with it).
    not_an_average: ClassVar[str | None] = "its server step is not the weighted average of the uploads"
    combined_folder: ClassVar[str | None] = None  # where the recipe saves ``combined_adapter``

    @property
    def merges_into_base(self) -> bool:
        """Whether a download merges a dense update (``<module>.base_delta``) into the client's
        base weights, so that an engine must add it to W0."""
        return BASE_DELTA in self.local

    @property
    def init_parts(self) -> frozenset[str]:
        """The parts of a client's round-0 state that ``apply_download`` reads (``init``): an
        engine that keeps the round-0 state between messages needs to keep only these.
        Default: none (the download and the client's own state are all it uses)."""
        return frozenset()

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

    # --- what the server state and the clients amount to (engines and recipes ask these) -------
    def global_adapter(self, server: Mapping[str, Tensor], init: Mapping[str, Tensor]) -> Tensors:
        """``global_model == "adapter"``: the global adapter's tensors, the server's averaged
        tensors completed by ``init`` (the round-0 state of the largest-rank client) for parts
        that are never trained and common to all clients (FFA-LoRA's A)."""
        return {**init, **server}

    def global_delta(self, server: Mapping[str, Tensor]) -> Tensors:
        """``global_model`` "dense" or "base": the (d_out, d_in) updates to add to W0, keyed
        ``<module>.<part>``."""
        return select(server, {BASE_DELTA})

    def combined_adapter(
        self, config: AdapterConfig, states: Sequence[Mapping[str, Tensor]], server: Mapping[str, Tensor]
    ) -> tuple[AdapterConfig, Tensors] | None:
        """The whole federation as one adapter (``config`` is client 0's), or None where the
        method has no such view."""
        return None

    def export_model(self, model: AsymLoraModel, server: Callable[[], Mapping[str, Tensor]]) -> AsymLoraModel:
        """A client's final model as one a plain LoRA exporter can write (``server`` reads the
        server's final state, where the method needs it). Default: the model as it is."""
        return model


AGGREGATIONS = ("mean", "median", "trimmed-mean")


@dataclass(frozen=True)
class AverageUploads(FederatedMethod):
    """Methods whose server takes the weighted average sum_i p_i of each uploaded tensor and
    sends it back to every client, which overwrites its own copy (FedIT, FFA, FedSA, Fed-ALoRA:
    they differ only in which parts they train, upload and keep).

    ``aggregation`` makes the average robust to a few bad uploads: ``"median"`` (element-wise
    median) or ``"trimmed-mean"`` (element-wise mean without the ``trim`` share of the smallest
    and of the largest values, at least one each where ``trim`` > 0); both unweighted. ``"mean"``
    (the default) is the weighted average of the paper."""

    not_an_average: ClassVar[str | None] = None

    aggregation: str = "mean"
    trim: float = 0.1

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} must be one of {', '.join(AGGREGATIONS)}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim={self.trim} must be in [0, 0.5)")

    def combine(
        self,
        uploads: Sequence[Mapping[str, Tensor]],
        p: list[float],
        s: list[float],
        server: Mapping[str, Tensor],
    ) -> tuple[Tensors, list[Tensors]]:
        if self.aggregation == "mean":
            avg = weighted_average(uploads, p)
        else:
            avg = key_by_key(uploads, self.robust_mean)
        return avg, [avg] * len(uploads)

    def robust_mean(self, tensors: list[Tensor]) -> Tensor:
        """The unweighted median or trimmed mean of one tensor's uploads."""
        if self.aggregation == "median":
            return coordinate_median(tensors)
        cut = min(math.ceil(self.trim * len(tensors)), (len(tensors) - 1) // 2)
        return trimmed_mean(tensors, cut)

    def apply_download(
        self, state: Mapping[str, Tensor], download: Mapping[str, Tensor], init: Mapping[str, Tensor]
    ) -> Tensors:
        # Copies: clients must not share storage with each other or with the server's state.
        return {**state, **{k: v.clone() for k, v in download.items()}}
