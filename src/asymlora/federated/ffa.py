"""FFA-LoRA: A frozen at a common initialisation, only B trained and averaged.

Per module: every client starts from the same A (setup sends client 0's A once) and never
trains it; it trains and uploads B (d_out, r); the server sends back sum_i p_i B_i. Since A is
common, sum_i p_i B_i A = (sum_i p_i B_i) A: the aggregation is exact. A stays on the client.
Communication: d_out r each way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import AverageUploads
from .common import A, B


@dataclass(frozen=True)
class FFALoRA(AverageUploads):
    name = "ffa"
    heterogeneous = False
    trains = frozenset({B})
    uploads = frozenset({B})
    local = frozenset({A})
    shared_init = frozenset({A, B})
    global_model = "adapter"

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        return d_out * rank, d_out * rank
