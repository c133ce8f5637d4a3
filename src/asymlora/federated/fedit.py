"""FedIT: FedAvg of A and of B separately.

Per module: the client trains A (r, d_in) and B (d_out, r) and uploads both; the server sends
back avg(A) = sum_i p_i A_i and avg(B) = sum_i p_i B_i. Nothing stays local. Not exact:
avg(B) avg(A) != sum_i p_i B_i A_i. Communication: (d_in + d_out) r each way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import AverageUploads
from .common import A, B


@dataclass(frozen=True)
class FedIT(AverageUploads):
    name = "fedit"
    heterogeneous = False
    trains = frozenset({A, B})
    uploads = frozenset({A, B})
    local = frozenset()
    shared_init = frozenset({A, B})
    global_model = "adapter"

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        return (d_in + d_out) * rank, (d_in + d_out) * rank
