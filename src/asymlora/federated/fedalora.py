"""Fed-ALoRA (the paper, homogeneous ranks): share B, keep each client's A.

Per module: client i trains its own A_i (r, d_in) and the shared B (d_out, r); it uploads B_i
only; the server sends back B = sum_i p_i B_i. A_i never leaves the client and is kept across
rounds. Viewed whole, the federation trains one ALoRA adapter with one A per client, a shared B
and client (task-id) routing. Communication: d_out r each way, half of FedIT's.

``client_a_init``: ``independent`` (default) draws each client's initial A from its own seed;
``common`` starts every client from one A (client 0's draw), as the reference does. A common start
puts the clients' A's in one subspace, so the B they average reads the same directions.

``reset_a_each_round=True`` puts every client's A back to its round-0 value at every round, so A
never accumulates training: with ``client_a_init=common`` that is the reference scripts' defect
(every client back to one common A); with ``independent``, each client back to its own draw. Off
by default. The two switches make the 2 x 2 ablation of the A initialisation.

Measured (docs/results.md, the reasoning federation, three seeds, 10 rounds x 5 local steps):
common - independent +0.2 [-0.9, 1.5] points; the reset costs 12-14 points. The default stays
``independent``: no budget where A trains shows a difference (with 1-step rounds, where A cannot
adapt to B, ``common`` is the better choice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import AverageUploads
from .common import A, B, Tensors, broadcast, check_a_init, module_of, select

if TYPE_CHECKING:
    from ..adapters import AdapterConfig


@dataclass(frozen=True)
class FedALoRA(AverageUploads):
    name = "fedalora"
    heterogeneous = False
    trains = frozenset({A, B})
    uploads = frozenset({B})
    local = frozenset({A})
    shared_init = frozenset({B})
    combined_folder = "alora"

    reset_a_each_round: bool = False  # the reference's defect, only on request
    client_a_init: str = "independent"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_a_init(self.client_a_init)

    def setup(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[Tensors, list[Tensors]]:
        # B starts common (zeros); A starts common only when asked
        return {}, broadcast(states, {A, B} if self.client_a_init == "common" else {B})

    @property
    def init_parts(self) -> frozenset[str]:
        return frozenset({A}) if self.reset_a_each_round else frozenset()

    def apply_download(
        self, state: Mapping[str, Tensor], download: Mapping[str, Tensor], init: Mapping[str, Tensor]
    ) -> Tensors:
        new = super().apply_download(state, download, init)
        new.update({k: v.clone() for k, v in select(init, self.init_parts).items()})
        return new

    def combined_adapter(
        self, config: AdapterConfig, states: Sequence[Mapping[str, Tensor]], server: Mapping[str, Tensor]
    ) -> tuple[AdapterConfig, Tensors] | None:
        """The federation as one ALoRA adapter: lora_A (N*r, d_in) stacks the clients' A's, lora_B
        is the server's shared B, and task routing sends task i to client i's A. (With fraction
        < 1 a client that sat out the last round still holds the previous B; the combined adapter
        uses the newest.) One client: None, its own adapter is the whole federation."""
        if len(states) < 2:
            return None
        combined = replace(
            config, method="alora", router="task", num_experts=len(states), init_a="independent"
        )
        state: Tensors = {}
        for key, b in server.items():
            module = module_of(key)
            state[key] = b
            state[f"{module}.{A}"] = torch.cat([s[f"{module}.{A}"] for s in states], dim=0)
        return combined, state

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        return d_out * rank, d_out * rank
