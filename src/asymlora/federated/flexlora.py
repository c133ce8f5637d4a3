"""FlexLoRA: average the full products, truncated SVD back to each client's rank.

Per module: client i trains A_i (r_i, d_in) and B_i (d_out, r_i) and uploads both. The server
forms the dense weighted average of the clients' updates, with their scales s_i = alpha_i / r_i,

    W = sum_i p_i s_i B_i A_i                       (d_out, d_in)

keeps it as the global update, and sends client i the best rank-r_i approximation of W
(Eckart-Young), as factors at the client's rank: with W = U S V^T,

    B_i = U_r sqrt(S_r / s_i)    (d_out, r_i)       A_i = sqrt(S_r / s_i) V_r^T    (r_i, d_in)

so that s_i B_i A_i = U_r S_r V_r^T. The singular values are split evenly (square root on each
side), which keeps A and B at similar norms; any other split gives the same product. Nothing
stays local. Communication: (d_in + d_out) r_i each way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import FederatedMethod
from .common import A, B, Tensors, modules, rank_of, select, weighted_sum

DELTA = "delta"  # the server's global dense update W (d_out, d_in)


def low_rank_factors(
    u: Tensor, s: Tensor, vh: Tensor, rank: int, scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(B, A) with scale * B @ A the rank-``rank`` truncation of U diag(S) V^T."""
    root = torch.sqrt(s[:rank] / scale)
    return (u[:, :rank] * root).to(dtype), (root[:, None] * vh[:rank]).to(dtype)


@dataclass(frozen=True)
class FlexLoRA(FederatedMethod):
    name = "flexlora"
    heterogeneous = True
    trains = frozenset({A, B})
    uploads = frozenset({A, B})
    local = frozenset()
    global_model = "dense"
    not_an_average = (
        "its server averages the products s_i B_i A_i and sends each client a truncated SVD of "
        "that average, not the average of the uploaded factors"
    )

    def combine(
        self,
        uploads: Sequence[Mapping[str, Tensor]],
        p: list[float],
        sc: list[float],
        server: Mapping[str, Tensor],
    ) -> tuple[Tensors, list[Tensors]]:
        new_server: Tensors = {}
        downs: list[Tensors] = [{} for _ in uploads]
        for mod in modules(uploads[0], A):
            # float64 for an accurate SVD; each product is (d_out, d_in)
            products = [
                si * (up[f"{mod}.{B}"].double() @ up[f"{mod}.{A}"].double())
                for up, si in zip(uploads, sc, strict=True)
            ]
            w = weighted_sum(products, p)
            dtype = uploads[0][f"{mod}.{A}"].dtype
            new_server[f"{mod}.{DELTA}"] = w.to(dtype)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            for down, up, si in zip(downs, uploads, sc, strict=True):
                r = rank_of(up, mod)
                if r > s.shape[0]:
                    raise ValueError(f"{mod}: rank {r} exceeds min(d_out, d_in) = {s.shape[0]}")
                down[f"{mod}.{B}"], down[f"{mod}.{A}"] = low_rank_factors(u, s, vh, r, si, dtype)
        return new_server, downs

    def global_delta(self, server: Mapping[str, Tensor]) -> Tensors:
        return select(server, {DELTA})

    def apply_download(
        self, state: Mapping[str, Tensor], download: Mapping[str, Tensor], init: Mapping[str, Tensor]
    ) -> Tensors:
        return {**state, **{k: v.clone() for k, v in download.items()}}

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        return (d_in + d_out) * rank, (d_in + d_out) * rank
