"""FedSA-LoRA: A averaged across clients, B kept local (the opposite of Fed-ALoRA).

Per module: the client trains A (r, d_in) and B (d_out, r), uploads A only; the server sends
back sum_i p_i A_i; B never leaves the client. Communication: d_in r each way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import AverageUploads
from .common import A, B


@dataclass(frozen=True)
class FedSALoRA(AverageUploads):
    name = "fedsa"
    heterogeneous = False
    trains = frozenset({A, B})
    uploads = frozenset({A})
    local = frozenset({B})
    shared_init = frozenset({A})

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        return d_in * rank, d_in * rank
