"""Fed-ALoRA-het (the paper, heterogeneous ranks): a shared B built up in a server-held base.

Per module, client i of rank r_i holds A_i (r_i, d_in), M_i (d_m, r_i), B1_i (r_i, d_m),
B2_i (d_out, r_i, zeros at start) and a frozen copy of the server's B_base (d_out, d_m):

    dW_i x = s_i (B_base + B2_i B1_i) M_i A_i x

It trains A_i, M_i, B1_i, B2_i and uploads B1_i and B2_i: r_i (d_m + d_out) numbers. The server
forms each d_out x d_m product B2_i B1_i, averages with weights p_i and accumulates

    B_base <- B_base + sum_i p_i B2_i B1_i

then sends B_base down (d_out d_m). The client replaces its B_base and sets B2_i to zeros,
keeping B1_i, A_i and M_i. Why B2 = 0: the client's shared factor becomes
B_base_new + 0 = B_base_old + sum_j p_j B2_j B1_j, i.e. its own B2_i B1_i is now inside B_base
(exactly so when it is the only participant, in which case its function is unchanged), and
keeping B2_i B1_i on top would count it twice. B1_i is kept (not re-drawn) so that the next
round's B2_i gets a non-zero gradient, as after LoRA's B = 0 start. A_i and M_i never leave the
client. d_m caps the rank of the shared part (the reference hard-codes 16 and alpha = 2 r_i).

``client_a_init``: ``independent`` (default) keeps each client's own draw of A_i, M_i and B1_i;
``common`` starts them from one draw, the highest-rank client's: client i takes its leading r_i
rows of A and B1 and its leading r_i columns of M (rescaled to the kaiming bound of its own
fan-in r_i, so every client's start is distributed as its own draw would be). Clients of equal
rank then start identical, as in Fed-ALoRA's ``common``; clients of lower rank start in a
subspace of the top rank's, so the d_m-dimensional code M_i A_i x that B_base reads is partly
shared.

``reset_a_each_round=True`` reproduces the reference scripts, which build every client afresh
each round (same seed): A_i, M_i and B1_i go back to the client's round-0 values.
The scales s_i are not used by the server: they multiply B_base and B2_i B1_i alike.

Measured at ranks 64, 32, 16, 8 (docs/results.md, three seeds): common - independent +0.0
[-1.2, 1.2] points, so ``independent`` stays the default here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..adapters.layer import FACTORED_DRAWN, FACTORED_RANK_DIM, factored_shapes, kaiming_leading
from .base import FederatedMethod
from .common import (
    B1,
    B2,
    B_BASE,
    A,
    M,
    Tensors,
    broadcast,
    check_a_init,
    modules,
    part,
    select,
    weighted_sum,
)


@dataclass(frozen=True)
class FedALoRAHet(FederatedMethod):
    name = "fedalora-het"
    heterogeneous = True
    trains = frozenset({A, M, B1, B2})
    uploads = frozenset({B1, B2})
    local = frozenset({A, M})
    shared_init = frozenset({B_BASE})
    adapter_kind = "factored"
    not_an_average = (
        "its server accumulates the products B2_i B1_i into the B_base it holds and sends B_base "
        "down, not an average of the uploaded B1_i, B2_i"
    )

    reset_a_each_round: bool = False  # the reference's per-round rebuild, only on request
    client_a_init: str = "independent"

    def __post_init__(self) -> None:
        check_a_init(self.client_a_init)

    def setup(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[Tensors, list[Tensors]]:
        states = broadcast(states, {B_BASE})
        if self.client_a_init == "common":
            states = leading_of_top_rank(states)
        return {k: v.clone() for k, v in select(states[0], {B_BASE}).items()}, states

    def combine(
        self,
        uploads: Sequence[Mapping[str, Tensor]],
        p: list[float],
        s: list[float],
        server: Mapping[str, Tensor],
    ) -> tuple[Tensors, list[Tensors]]:
        new_server = dict(server)
        for mod in modules(uploads[0], B1):
            key = f"{mod}.{B_BASE}"
            if key not in server:
                raise ValueError(f"the server has no {key}; call setup() first")
            products = [up[f"{mod}.{B2}"] @ up[f"{mod}.{B1}"] for up in uploads]  # (d_out, d_m) each
            new_server[key] = server[key] + weighted_sum(products, p)
        down = select(new_server, {B_BASE})
        return new_server, [down] * len(uploads)

    @property
    def init_parts(self) -> frozenset[str]:
        return frozenset({A, M, B1}) if self.reset_a_each_round else frozenset()

    def apply_download(
        self, state: Mapping[str, Tensor], download: Mapping[str, Tensor], init: Mapping[str, Tensor]
    ) -> Tensors:
        new = {**state, **{k: v.clone() for k, v in download.items()}}
        new.update({k: v.clone() for k, v in select(init, self.init_parts).items()})
        for mod in modules(state, B2):
            new[f"{mod}.{B2}"] = state[f"{mod}.{B2}"].new_zeros(state[f"{mod}.{B2}"].shape)
        return new

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        return rank * (d_m + d_out), d_out * d_m

    def state_shapes(self, d_in: int, d_out: int, rank: int, d_m: int) -> dict[str, tuple[int, ...]]:
        return factored_shapes(d_in, d_out, rank, d_m)


def leading_of_top_rank(states: Sequence[Mapping[str, Tensor]]) -> list[Tensors]:
    """Every client's drawn parts (A, M, B1) replaced by its rank's leading slice of the
    highest-rank client's (the first such client's)."""
    top = max(states, key=lambda state: next(v.shape[0] for k, v in state.items() if part(k) == A))
    out = []
    for state in states:
        new = dict(state)
        for key, draw in select(top, set(FACTORED_DRAWN)).items():
            dim = FACTORED_RANK_DIM[part(key)]
            new[key] = kaiming_leading(draw, dim, state[key].shape[dim])
        out.append(new)
    return out
