"""How far A and B move during fine-tuning: magnitude and direction change, module by module.

Definitions (per expert block, each block turned by ``weights.directions`` into r rows):
- ``norm_change``  ||W_end - W_init||_F, absolute.
- ``relative``     ||W_end - W_init||_F / ||W_init||_F; None for B, which starts at zero.
- ``magnitude``    for A the relative change; for B, whose relative change does not exist,
                   ||B_end - B_init||_F / s_A, where s_A is the Frobenius norm of one initial A
                   block of the same module (root mean square over its blocks): B's movement in
                   the unit A's relative change uses, so the two can share one axis. Caveat:
                   B A is unchanged by (c A, B / c), so the split of scale between the factors is a
                   convention of the initialisation (kaiming A, zero B); compare like with like.
- ``direction``    mean over the r directions (rows of A, columns of B) of 1 - cos(init, end), in
                   [0, 2]. A zero initial vector has no direction: for B started at zero this is
                   None. To measure B's direction change, pass an early checkpoint as ``init``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..adapters.targets import layer_index
from ..errors import InputError
from .metrics import direction_change, mean, norm_change, relative_change
from .weights import KINDS, load_weights


def change(init: str | Path, final: str | Path) -> dict[str, Any]:
    """Magnitude and direction change of every A and B block between two saved adapters of the same
    shape (``init``: the adapter as initialised, or any earlier checkpoint; ``final``: the end).

    Returns a JSON-able dict: ``{"A": {"modules": [{"module", "layer", "norm_change": [per block],
    "relative": [...], "magnitude": [...], "direction": [...], "mean_magnitude", "mean_direction"},
    ...]}, "B": {...}, ...}`` (definitions in this module's docstring)."""
    w0, w1 = load_weights(init), load_weights(final)
    shapes0 = {k: tuple(v.shape) for k, v in w0.tensors.items()}
    shapes1 = {k: tuple(v.shape) for k, v in w1.tensors.items()}
    if shapes0 != shapes1 or w0.config.r != w1.config.r:
        raise InputError(f"{w0.folder} and {w1.folder} are not the same adapter at two times (shapes differ)")
    result: dict[str, Any] = {
        "analysis": "change",
        "init": str(w0.folder),
        "final": str(w1.folder),
        "method": w1.config.method,
    }
    for kind in KINDS:
        rows = []
        for module in w0.modules:
            a_init = w0.tensors[f"{module}.lora_A"]  # (K_a*r, d_in)
            a_scale = float(torch.linalg.norm(a_init.double().flatten())) / math.sqrt(w0.config.k_a)
            befores, afters = w0.blocks(module, kind), w1.blocks(module, kind)
            norms = [norm_change(x, y) for x, y in zip(befores, afters, strict=True)]
            relative = [relative_change(x, y) for x, y in zip(befores, afters, strict=True)]
            magnitude = relative if kind == "A" else [n / a_scale if a_scale > 0 else None for n in norms]
            direction = [direction_change(x, y) for x, y in zip(befores, afters, strict=True)]
            rows.append(
                {
                    "module": module,
                    "layer": layer_index(module),
                    "norm_change": norms,
                    "relative": relative,
                    "magnitude": magnitude,
                    "direction": direction,
                    "mean_magnitude": mean(magnitude),
                    "mean_direction": mean(direction),
                }
            )
        result[kind] = {"modules": rows}
    return result
