"""Pieces every federated method shares: key names, example-count weights, weighted sums.

A client's adapter state is a flat dict of named tensors, one entry per adapted module and per
matrix, keyed ``"<module>.<part>"`` (``"model.layers.0.self_attn.q_proj.lora_A"``). The parts
are the adapter layer's names for plain LoRA (``lora_A`` (r, d_in), ``lora_B`` (d_out, r),
scale s = alpha / r) and, for Fed-ALoRA-het, ``lora_A``, ``lora_M``, ``lora_B1``, ``lora_B2`` and
``lora_B_base``. Methods select what they send by part name, so the rule "this never leaves the
client" is one set of part names, checked once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

Tensors = dict[str, Tensor]

# Part names of the adapter tensors (the adapter layer's names).
A, B = "lora_A", "lora_B"  # A: (r, d_in), B: (d_out, r)
# Fed-ALoRA-het's factored layer (shapes: adapters.layer.factored_shapes).
M, B1, B2, B_BASE = "lora_M", "lora_B1", "lora_B2", "lora_B_base"
# A client-side dense update to add to the frozen base weight W0 (d_out, d_in); FLoRA merges into it.
BASE_DELTA = "base_delta"


def part(key: str) -> str:
    """``"layers.0.q_proj.lora_A"`` -> ``"lora_A"``."""
    return key.rsplit(".", 1)[-1]


def module_of(key: str) -> str:
    """``"layers.0.q_proj.lora_A"`` -> ``"layers.0.q_proj"``."""
    return key.rsplit(".", 1)[0]


def modules(state: Mapping[str, Tensor], with_part: str) -> list[str]:
    """Names of the modules that have a tensor called ``with_part``, in the state's order."""
    return [module_of(k) for k in state if part(k) == with_part]


def select(state: Mapping[str, Tensor], parts: Iterable[str]) -> Tensors:
    """The entries of ``state`` whose part name is in ``parts``."""
    wanted = set(parts)
    return {k: v for k, v in state.items() if part(k) in wanted}


def example_weights(weights: Sequence[float], n_uploads: int) -> list[float]:
    """p_i = n_i / sum_j n_j from example counts (or any non-negative weights)."""
    if len(weights) != n_uploads:
        raise ValueError(f"got {n_uploads} uploads but {len(weights)} weights")
    if n_uploads == 0:
        raise ValueError("no uploads to aggregate")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {list(weights)}")
    return [float(w) / total for w in weights]


def client_scales(scales: Sequence[float] | None, n_uploads: int) -> list[float]:
    """The LoRA scale s_i = alpha_i / r_i of each uploading client (1.0 when not given)."""
    if scales is None:
        return [1.0] * n_uploads
    if len(scales) != n_uploads:
        raise ValueError(f"got {n_uploads} uploads but {len(scales)} scales")
    return [float(s) for s in scales]


def same_keys(uploads: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """The common key list of all uploads; raises if clients sent different sets of tensors."""
    keys = list(uploads[0])
    for i, up in enumerate(uploads[1:], start=1):
        if set(up) != set(keys):
            diff = sorted(set(up) ^ set(keys))[:4]
            raise ValueError(f"upload {i} has different tensors than upload 0 (e.g. {diff})")
    return keys


def key_by_key(uploads: Sequence[Mapping[str, Tensor]], combine: Callable[[list[Tensor]], Tensor]) -> Tensors:
    """``combine`` of the uploads' tensors, key by key; all uploads must hold the same keys and
    shapes."""
    out: Tensors = {}
    for key in same_keys(uploads):
        shapes = {tuple(up[key].shape) for up in uploads}
        if len(shapes) > 1:
            raise ValueError(
                f"{key}: clients sent different shapes {sorted(shapes)}; "
                "this method needs every client at the same rank"
            )
        out[key] = combine([up[key] for up in uploads])
    return out


def weighted_average(uploads: Sequence[Mapping[str, Tensor]], p: Sequence[float]) -> Tensors:
    """sum_i p_i upload_i, key by key (FedAvg); all uploads must hold the same keys and shapes."""
    return key_by_key(uploads, lambda tensors: weighted_sum(tensors, p))


def weighted_sum(tensors: Sequence[Tensor], p: Sequence[float]) -> Tensor:
    """sum_i p_i t_i, accumulated in float32 (or wider) and returned in the inputs' dtype."""
    acc_dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype, device=tensors[0].device)
    for t, w in zip(tensors, p, strict=True):
        acc += w * t.to(acc_dtype)
    return acc.to(tensors[0].dtype)


def coordinate_median(tensors: Sequence[Tensor]) -> Tensor:
    """The element-wise median of the tensors (the mean of the two middle values for an even
    count), computed in float32 (or wider), returned in the inputs' dtype. Unweighted."""
    return trimmed_mean(tensors, (len(tensors) - 1) // 2)


def trimmed_mean(tensors: Sequence[Tensor], cut: int) -> Tensor:
    """The element-wise mean after dropping the ``cut`` smallest and ``cut`` largest values of
    every element; unweighted, accumulated in float32 (or wider), in the inputs' dtype."""
    if not 0 <= 2 * cut < len(tensors):
        raise ValueError(f"cannot drop {cut} values from each side of {len(tensors)}")
    acc_dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    ordered = torch.stack([t.to(acc_dtype) for t in tensors]).sort(dim=0).values
    return ordered[cut : len(tensors) - cut].mean(dim=0).to(tensors[0].dtype)


def rank_of(state: Mapping[str, Tensor], module: str) -> int:
    """A client's LoRA rank at ``module``: the number of rows of its A."""
    return state[f"{module}.{A}"].shape[0]


def broadcast(states: Sequence[Mapping[str, Tensor]], parts: Iterable[str]) -> list[Tensors]:
    """Give every client client 0's tensors for ``parts`` (a common initialisation, sent once)."""
    common = {k: v.clone() for k, v in select(states[0], parts).items()}
    out = []
    for i, state in enumerate(states):
        for k, v in common.items():
            if k not in state or state[k].shape != v.shape:
                raise ValueError(f"client {i} has no tensor {k} of shape {tuple(v.shape)}")
        out.append({**state, **{k: v.clone() for k, v in common.items()}})
    return out


A_INITS = ("independent", "common")  # client_a_init: each client's own draw, or one for all


def check_a_init(value: str) -> None:
    if value not in A_INITS:
        raise ValueError(f"client_a_init={value!r} must be one of {', '.join(A_INITS)}")


def lora_shapes(d_in: int, d_out: int, rank: int, d_m: int) -> dict[str, tuple[int, ...]]:
    """Plain LoRA's tensors at one module (``d_m`` unused)."""
    return {A: (rank, d_in), B: (d_out, rank)}
