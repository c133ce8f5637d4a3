"""ZeroPadding (HetLoRA-style) for clients of different ranks.

Per module: client i trains A_i (r_i, d_in) and B_i (d_out, r_i) and uploads both. The server
pads every A_i with zero rows and every B_i with zero columns to the largest rank r_max of the
round, averages them with weights p_i and keeps the result as the global adapter (r_max). It
sends the global adapter down at r_max and each client keeps its first r_i rows of A and
columns of B. Nothing stays local. This is the paper's count: upload (d_in + d_out) r_i,
download (d_in + d_out) r_max. (Sending each client only its truncation would cost
(d_in + d_out) r_i down; the method's result is the same.)

Setup makes the starting point common: the global adapter is the largest-rank client's, and
every client starts from its truncation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import FederatedMethod
from .common import A, B, Tensors, modules, rank_of, weighted_sum


def pad_rank(t: Tensor, which: str, r_max: int) -> Tensor:
    """Zero-pad A (r, d_in) -> (r_max, d_in) or B (d_out, r) -> (d_out, r_max)."""
    if which == A:
        return torch.cat([t, t.new_zeros(r_max - t.shape[0], t.shape[1])], dim=0)
    return torch.cat([t, t.new_zeros(t.shape[0], r_max - t.shape[1])], dim=1)


def truncate_to(state: Mapping[str, Tensor], glob: Mapping[str, Tensor]) -> Tensors:
    """The global adapter cut to the ranks of ``state``: A[:r_i], B[:, :r_i] per module."""
    out = dict(state)
    for mod in modules(glob, A):
        r = rank_of(state, mod)
        out[f"{mod}.{A}"] = glob[f"{mod}.{A}"][:r].clone()
        out[f"{mod}.{B}"] = glob[f"{mod}.{B}"][:, :r].clone()
    return out


@dataclass(frozen=True)
class ZeroPad(FederatedMethod):
    name = "zeropad"
    heterogeneous = True
    trains = frozenset({A, B})
    uploads = frozenset({A, B})
    local = frozenset()
    global_model = "adapter"
    not_an_average = (
        "its server zero-pads every upload to the round's largest rank and each client keeps a "
        "truncation of the padded average"
    )

    def setup(self, states: Sequence[Mapping[str, Tensor]]) -> tuple[Tensors, list[Tensors]]:
        mod = modules(states[0], A)[0]
        largest = max(states, key=lambda s: rank_of(s, mod))
        glob = {k: v.clone() for k, v in self.upload(largest).items()}
        return glob, [truncate_to(s, glob) for s in states]

    def combine(
        self,
        uploads: Sequence[Mapping[str, Tensor]],
        p: list[float],
        s: list[float],
        server: Mapping[str, Tensor],
    ) -> tuple[Tensors, list[Tensors]]:
        glob: Tensors = {}
        for mod in modules(uploads[0], A):
            r_max = max(rank_of(up, mod) for up in uploads)
            for which in (A, B):
                key = f"{mod}.{which}"
                glob[key] = weighted_sum([pad_rank(up[key], which, r_max) for up in uploads], p)
        return glob, [glob] * len(uploads)

    def apply_download(
        self, state: Mapping[str, Tensor], download: Mapping[str, Tensor], init: Mapping[str, Tensor]
    ) -> Tensors:
        return truncate_to(state, download)

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        return (d_in + d_out) * rank, (d_in + d_out) * max(ranks)
