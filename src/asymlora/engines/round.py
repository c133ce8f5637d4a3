"""The server's side of a federated round, the same for every engine (the in-process simulator,
Flower): who takes part, which uploads are accepted, whether enough are left, the method's
aggregation, the downloads, and the line of ``rounds.jsonl``.

An engine only moves tensors between the server and its clients::

    server = Server(method, members, fraction=..., seed=..., min_clients=..., limits=...)
    setups = server.setup(inits)                 # once: method.setup; the layouts uploads are held to
    for rnd in 1..R:
        chosen = server.participants(rnd)
        # the engine runs the chosen clients (one after another in process, or over messages)
        log = server.aggregate(rnd, uploads, losses, dropped)   # accept (validate, min_clients), combine
        # the engine hands log.downloads[k] to client log.participants[k]
        records.append(server.record(log, records))

Everything here is a function of (method, members, seed, round, uploads): two engines given the
same uploads compute the same server state, downloads and record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

import torch
from torch import Tensor

from ..errors import AsymloraError
from ..federated import FederatedMethod
from ..federated.comm import from_wire, round_counts, to_wire
from ..federated.common import Tensors
from ..federated.registry import rank_problem
from ..federated.validate import UploadLimits, expected_upload, validate_uploads
from ..train.batches import hash_seed

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """A client as the server knows it: its name, rank, aggregation weight (its number of
    training examples), LoRA scale alpha / r, and where it runs (for messages: ``" (node 7)"``)."""

    name: str
    rank: int
    examples: int
    scale: float
    where: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}{self.where}"


@dataclass
class RoundLog:
    """What one round did: whose uploads were aggregated, the mean local loss of each, the exact
    communication of each (parameters and bytes, up and down) and its download, in participant
    order; and the clients left out of the aggregate: ``dropped`` (local training failed, or no
    reply) and ``rejected`` (the upload failed validation), as (client, reason)."""

    round: int
    participants: list[int]
    loss: list[float] = field(default_factory=list)
    comm: list[dict[str, int]] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    downloads: list[Tensors] = field(default_factory=list, repr=False)


class RoundError(AsymloraError, RuntimeError):
    """Too few clients were left in a round after drops and rejections; ``log`` says why."""

    def __init__(self, rnd: int, min_clients: int, accepted: list[str], reasons: list[str], log: RoundLog):
        super().__init__(
            f"round {rnd}: only {len(accepted)} valid upload(s) ({', '.join(accepted) or 'none'}), "
            f"federation.min_clients={min_clients} needed; left out: " + "; ".join(reasons)
        )
        self.log = log


def participants(num_clients: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """The clients of round ``rnd``: ``max(1, round(fraction * N))`` of them, drawn without
    replacement by a generator seeded with (seed, round); sorted."""
    k = max(1, round(fraction * num_clients))
    if k >= num_clients:
        return list(range(num_clients))
    gen = torch.Generator().manual_seed(hash_seed(seed, rnd))
    return sorted(torch.randperm(num_clients, generator=gen)[:k].tolist())


class Server:
    """The server of a federation of ``members`` (client i is ``members[i]``) running ``method``.

    ``state`` is the method's server state (the global adapter, FLoRA's merged update, ...);
    ``warn`` receives one line per client left out of a round. Clients are weighted by their
    examples, or all alike with ``equal_weights`` (what central DP's noise is calibrated for).
    Uploads and downloads travel in ``wire`` (float32, bfloat16, float16): uploads are checked in
    it and aggregated in float32, downloads are cast to it, and the round's bytes count it."""

    def __init__(
        self,
        method: FederatedMethod,
        members: Sequence[Member],
        *,
        fraction: float = 1.0,
        seed: int = 0,
        min_clients: int = 1,
        limits: UploadLimits | None = None,
        warn: Callable[[str], None] = _logger.warning,
        equal_weights: bool = False,
        wire: torch.dtype = torch.float32,
    ) -> None:
        if not members:
            raise ValueError("a federation needs at least one client")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must be in (0, 1]")
        if min_clients < 1:
            raise ValueError(f"min_clients={min_clients} must be >= 1")
        problem = rank_problem(method.name, [m.rank for m in members])
        if problem is not None:
            raise ValueError(problem)
        self.method, self.members = method, list(members)
        self.fraction, self.seed, self.min_clients = fraction, seed, min_clients
        self.limits, self.warn, self.equal_weights = limits or UploadLimits(), warn, equal_weights
        self.wire = wire
        self.state: Tensors = {}
        self.specs: dict[int, dict] = {}

    def setup(self, inits: Sequence[Mapping[str, Tensor]]) -> list[Tensors]:
        """Round 0: the method's common starting point for every client (its round-0 state), and
        the layout each client's uploads are held to from then on (its declared rank)."""
        self.state, setups = self.method.setup(inits)
        self.specs = {i: expected_upload(self.method, s, self.wire) for i, s in enumerate(setups)}
        return setups

    def participants(self, rnd: int) -> list[int]:
        """The clients taking part in round ``rnd``."""
        return participants(len(self.members), self.fraction, self.seed, rnd)

    def aggregate(
        self,
        rnd: int,
        uploads: Sequence[tuple[int, Any]],
        losses: Mapping[int, float],
        dropped: Sequence[tuple[int, str]] = (),
    ) -> RoundLog:
        """Close round ``rnd``: ``accept`` the uploads, then ``combine`` the accepted ones."""
        log, accepted = self.accept(rnd, uploads, losses, dropped)
        return self.combine(log, accepted)

    def accept(
        self,
        rnd: int,
        uploads: Sequence[tuple[int, Any]],
        losses: Mapping[int, float],
        dropped: Sequence[tuple[int, str]] = (),
    ) -> tuple[RoundLog, list[Tensors]]:
        """Validate the ``(client, upload)`` pairs of round ``rnd``; ``dropped``: clients already
        left out, with why. Returns the round's log (participants: the accepted clients, in the
        order given) and their uploads. Raises ``RoundError`` when fewer than ``min_clients`` are
        accepted."""
        log = RoundLog(rnd, [], dropped=list(dropped))
        accepted, log.rejected = validate_uploads(uploads, self.specs, self.limits)
        for what, items in (("dropped", log.dropped), ("rejected the upload of", log.rejected)):
            for i, reason in items:
                self.warn(f"round {rnd}: {what} client {self.members[i].label}: {reason}")
        if len(accepted) < self.min_clients:
            names = [self.members[i].name for i, _ in accepted]
            why = [f"{self.members[i].name}: {r}" for i, r in log.dropped + log.rejected]
            raise RoundError(rnd, self.min_clients, names, why, log)
        log.participants = [i for i, _ in accepted]
        log.loss = [float(losses[i]) for i in log.participants]
        return log, [up for _, up in accepted]

    def combine(self, log: RoundLog, uploads: Sequence[Mapping[str, Tensor]]) -> RoundLog:
        """The method's aggregation of the accepted ``uploads`` (one per ``log.participants``, as
        they travelled), in float32, into the new ``state`` and one download each, in the wire
        dtype; fills ``log.downloads`` and ``log.comm``."""
        kept = [self.members[i] for i in log.participants]
        weights = [1 if self.equal_weights else m.examples for m in kept]
        received = [from_wire(up) for up in uploads]
        self.state, downloads = self.method.aggregate(received, weights, self.state, [m.scale for m in kept])
        log.downloads = [to_wire(d, self.wire) for d in downloads]
        log.comm = round_counts(list(uploads), log.downloads)
        return log

    def record(self, log: RoundLog, previous: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The round as one line of ``rounds.jsonl``: whose uploads were aggregated, their loss,
        the exact bytes per client and their means, the cumulative bytes (up + down) an average
        participant has sent and received so far (``previous``: the earlier rounds' lines), and
        the clients left out with the reason: ``dropped``, ``rejected``."""
        names = [self.members[i].name for i in log.participants]
        up = fmean(c["bytes_up"] for c in log.comm)
        down = fmean(c["bytes_down"] for c in log.comm)
        return {
            "round": log.round,
            "participants": names,
            "loss": dict(zip(names, log.loss, strict=True)),
            "comm": dict(zip(names, log.comm, strict=True)),
            "bytes_up": up,
            "bytes_down": down,
            "cumulative_bytes": (previous[-1]["cumulative_bytes"] if previous else 0.0) + up + down,
            "dropped": {self.members[i].name: why for i, why in log.dropped},
            "rejected": {self.members[i].name: why for i, why in log.rejected},
        }
