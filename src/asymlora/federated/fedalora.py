"""Fed-ALoRA (the paper, homogeneous ranks): share B, keep each client's A.

Per module: client i trains its own A_i (r, d_in) and the shared B (d_out, r); it uploads B_i
only; the server sends back B = sum_i p_i B_i. A_i never leaves the client and is kept across
rounds. Viewed whole, the federation trains one ALoRA adapter with one A per client, a shared B
and client (task-id) routing. Communication: d_out r each way, half of FedIT's.

``reset_a_each_round=True`` reproduces the reference scripts' defect: every client's A is put
back to one common initial A (client 0's, made common by setup) at every round, so A never
accumulates training. Off by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from .base import AverageUploads
from .common import A, B, Tensors, broadcast, select


@dataclass(frozen=True)
class FedALoRA(AverageUploads):
    name = "fedalora"
    heterogeneous = False
    trains = frozenset({A, B})
    uploads = frozenset({B})
    local = frozenset({A})
    shared_init = frozenset({B})

    reset_a_each_round: bool = False  # the reference's defect, only on request

    def setup(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[Tensors, list[Tensors]]:
        # Each client keeps the A it was initialised with (independent seeds are the point of
        # the paper); only the reference's reset needs one common A.
        parts = {A, B} if self.reset_a_each_round else {B}
        return {}, broadcast(states, parts)

    def apply_download(
        self, state: Mapping[str, Tensor], download: Mapping[str, Tensor], init: Mapping[str, Tensor]
    ) -> Tensors:
        new = {**state, **download}
        if self.reset_a_each_round:
            new.update({k: v.clone() for k, v in select(init, {A}).items()})
        return new

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        return d_out * rank, d_out * rank
