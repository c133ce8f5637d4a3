"""FLoRA: stack the clients' adapters along the rank axis, merge the exact sum into W0.

Per module: client i trains A_i (r_i, d_in) and B_i (d_out, r_i) and uploads both. The server
stacks them along the rank axis, folding each client's weight p_i and scale s_i = alpha_i / r_i
into its block of B:

    A_stack = [A_1; A_2; ...]                      (R, d_in),  R = sum_i r_i
    B_stack = [p_1 s_1 B_1, p_2 s_2 B_2, ...]      (d_out, R)
    B_stack A_stack = sum_i p_i s_i B_i A_i        exactly (no cross terms)

and sends both stacks to every client, which merges B_stack A_stack into its frozen base weight
(kept on the client as the dense ``<module>.base_delta`` (d_out, d_in), which the engine adds to
W0) and restarts its adapter from its round-0 state (B = 0, so the merged model is unchanged).
The server keeps the running merged delta as the global model.

Communication, as counted: up (d_in + d_out) r_i; down (d_in + d_out) R, the stacks, as in the
FLoRA paper (it grows with the number of clients). With ``dense_download=True`` the server
sends the product B_stack A_stack instead, d_out d_in down, which is cheaper only when
R > d_in d_out / (d_in + d_out) (2048 for a 4096 x 4096 projection).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..adapters import AsymLoraModel, wrap
from .base import FederatedMethod
from .common import (
    BASE_DELTA,
    A,
    B,
    Tensors,
    modules,
    select,
)

A_STACK, B_STACK = "lora_A_stack", "lora_B_stack"  # (R, d_in), (d_out, R)


def merged_delta(download: Mapping[str, Tensor], mod: str) -> Tensor:
    """The (d_out, d_in) update a download adds to W0 at ``mod``."""
    if f"{mod}.{BASE_DELTA}" in download:
        return download[f"{mod}.{BASE_DELTA}"]
    return download[f"{mod}.{B_STACK}"] @ download[f"{mod}.{A_STACK}"]


@dataclass(frozen=True)
class FLoRA(FederatedMethod):
    name = "flora"
    heterogeneous = True
    trains = frozenset({A, B})
    uploads = frozenset({A, B})
    local = frozenset({BASE_DELTA})
    global_model = "base"
    not_an_average = (
        "its server stacks the uploads along the rank axis (the exact sum of the clients' "
        "products), with no average of the uploaded tensors to clip, noise or make robust"
    )

    dense_download: bool = False  # send B_stack A_stack (d_out, d_in) instead of the two stacks

    def combine(
        self,
        uploads: Sequence[Mapping[str, Tensor]],
        p: list[float],
        s: list[float],
        server: Mapping[str, Tensor],
    ) -> tuple[Tensors, list[Tensors]]:
        down: Tensors = {}
        for mod in modules(uploads[0], A):
            a_stack = torch.cat([up[f"{mod}.{A}"] for up in uploads], dim=0)
            b_stack = torch.cat(
                [w * si * up[f"{mod}.{B}"] for up, w, si in zip(uploads, p, s, strict=True)], dim=1
            )
            if self.dense_download:
                down[f"{mod}.{BASE_DELTA}"] = b_stack @ a_stack
            else:
                down[f"{mod}.{A_STACK}"], down[f"{mod}.{B_STACK}"] = a_stack, b_stack
        new_server = dict(server)
        for mod in modules(uploads[0], A):
            key = f"{mod}.{BASE_DELTA}"
            delta = merged_delta(down, mod)
            new_server[key] = server[key] + delta if key in server else delta
        return new_server, [down] * len(uploads)

    @property
    def init_parts(self) -> frozenset[str]:
        return frozenset({A, B})  # the adapter restarts from its round-0 state each round

    def apply_download(
        self, state: Mapping[str, Tensor], download: Mapping[str, Tensor], init: Mapping[str, Tensor]
    ) -> Tensors:
        fresh = {k: v.clone() for k, v in select(init, self.init_parts).items()}
        new = {**state, **fresh}
        for mod in modules(state, A):
            key = f"{mod}.{BASE_DELTA}"
            delta = merged_delta(download, mod)
            new[key] = state[key] + delta if key in state else delta
        return new

    @torch.no_grad()
    def export_model(self, model: AsymLoraModel, server: Callable[[], Mapping[str, Tensor]]) -> AsymLoraModel:
        """A client's model W0 + D + s B A, with D the update merged into the base
        (``<module>.base_delta`` (d_out, d_in) in the server state), as one plain LoRA on W0 of
        rank r' = r + max d_in and scale 1:

            A' = [A; I; 0]   (r', d_in)        B' = [s B, D, 0]   (d_out, r')

        so that B' A' = s B A + D; the identity block passes x through to D unchanged. Large
        (rank about d_in), but exact and loadable by any PEFT LoRA reader. Consumes ``model``'s
        wrapping."""
        deltas = server()
        width = max(layer.d_in for layer in model.adapted.values())
        state = {}
        for name, layer in model.adapted.items():
            a, b = layer.lora_pair()
            delta = deltas[f"{name}.{BASE_DELTA}"].to(b)
            eye = torch.eye(layer.d_in, dtype=a.dtype, device=a.device)
            state[f"{name}.{A}"] = torch.cat([a, eye, a.new_zeros(width - layer.d_in, layer.d_in)])
            state[f"{name}.{B}"] = torch.cat(
                [layer.scale * b, delta, b.new_zeros(b.shape[0], width - layer.d_in)], 1
            )
        config = model.adapter_config
        rank = config.r + width
        merged = wrap(model.unload(), replace(config, r=rank, alpha=float(rank), dropout=0.0))
        merged.load_adapter_state_dict(state)
        return merged

    def comm_per_module(
        self, d_in: int, d_out: int, rank: int, ranks: Sequence[int], d_m: int
    ) -> tuple[int, int]:
        down = d_in * d_out if self.dense_download else (d_in + d_out) * sum(ranks)
        return (d_in + d_out) * rank, down
