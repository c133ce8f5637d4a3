"""Layer-by-layer subspace similarity of the A's and of the B's of two saved adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapters.targets import layer_index
from ..errors import InputError
from .metrics import mean, subspace_similarity
from .weights import KINDS, AdapterWeights, load_weights


def expert_pairs(
    a: AdapterWeights, b: AdapterWeights, expert_a: int | None, expert_b: int | None
) -> list[tuple[int, int]]:
    """Which experts to compare. Neither chosen: expert k of one with expert k of the other (a
    single-expert adapter, plain LoRA, is compared with every expert of the other). One chosen:
    the other defaults to the same index. Both: exactly that pair, e.g. (0, 1) on the same run
    compares two tasks' experts of one adapter."""
    n_a, n_b = a.config.num_experts, b.config.num_experts
    if expert_a is None and expert_b is None:
        if n_a == n_b:
            return [(k, k) for k in range(n_a)]
        if min(n_a, n_b) == 1:
            return [(0 if n_a == 1 else k, 0 if n_b == 1 else k) for k in range(max(n_a, n_b))]
        raise InputError(
            f"the adapters have {n_a} and {n_b} experts: choose which to compare (expert_a, expert_b)"
        )
    ea = expert_a if expert_a is not None else expert_b
    eb = expert_b if expert_b is not None else expert_a
    for name, e, n in (("expert_a", ea, n_a), ("expert_b", eb, n_b)):
        if not 0 <= e < n:
            raise InputError(f"{name}={e} must be in 0..{n - 1}")
    return [(ea, eb)]


def similarity(
    run_a: str | Path,
    run_b: str | Path,
    i: int | None = None,
    j: int | None = None,
    expert_a: int | None = None,
    expert_b: int | None = None,
) -> dict[str, Any]:
    """phi(i, j) between the A blocks and between the B blocks of two adapters, module by module.

    ``run_a``/``run_b``: adapter folders or run folders holding ``adapter/`` (or ``checkpoint/``).
    ``i``/``j``: how many top singular directions of each side (default: all r of them). A is
    compared by its row space, B by its column space (see ``weights``). Experts are paired as
    ``expert_pairs`` says; a matrix shared by all experts (ALoRA's B) is compared once.

    Returns a JSON-able dict: ``{"A": {"blocks": [[block_a, block_b], ...], "modules": [{"module",
    "layer", "phi": [one per block pair], "mean"}, ...]}, "B": {...}, ...}``. phi is None where a
    matrix has rank below i (j), as a B at its zero initialisation has."""
    wa, wb = load_weights(run_a), load_weights(run_b)
    i = wa.config.r if i is None else i
    j = wb.config.r if j is None else j
    if not 1 <= i <= wa.config.r or not 1 <= j <= wb.config.r:
        raise InputError(f"i={i} must be in 1..{wa.config.r} and j={j} in 1..{wb.config.r} (the ranks)")
    modules = [m for m in wa.modules if m in set(wb.modules)]
    if not modules:
        raise InputError(f"{wa.folder} and {wb.folder} adapt no module in common")
    pairs = expert_pairs(wa, wb, expert_a, expert_b)
    result: dict[str, Any] = {
        "analysis": "similarity",
        "run_a": str(wa.folder),
        "run_b": str(wb.folder),
        "method_a": wa.config.method,
        "method_b": wb.config.method,
        "i": i,
        "j": j,
        "experts": [list(p) for p in pairs],
        "only_in_a": [m for m in wa.modules if m not in set(modules)],
        "only_in_b": [m for m in wb.modules if m not in set(modules)],
    }
    for kind in KINDS:
        blocks = list(dict.fromkeys((wa.block_of(kind, ea), wb.block_of(kind, eb)) for ea, eb in pairs))
        rows = []
        for module in modules:
            xs, ys = wa.blocks(module, kind), wb.blocks(module, kind)
            if xs[0].shape[1] != ys[0].shape[1]:
                raise InputError(f"{module}: {kind} has different sizes in the two adapters")
            phis = [subspace_similarity(xs[ba], ys[bb], i, j) for ba, bb in blocks]
            rows.append({"module": module, "layer": layer_index(module), "phi": phis, "mean": mean(phis)})
        result[kind] = {"blocks": [list(b) for b in blocks], "modules": rows}
    return result
