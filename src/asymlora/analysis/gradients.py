"""Per-task gradients on a shared matrix: their norms and how often two tasks pull it in opposite
directions, when A is shared (HydraLoRA: one A, one B per task) and when B is (ALoRA: one A per
task, one B).

Each task's gradient is that of its mean token loss over the batches given for it, with the model
routed to that task (task-id routing) and in eval mode (no dropout), taken by ``torch.autograd.grad``
so the model's ``.grad`` fields are left alone. Two tasks conflict on a module when the cosine of
their gradients on the shared matrix is negative.

At initialisation B = 0, so the gradient of A (s B^T dL/dy x^T) is exactly zero: run this on an
adapter trained for some steps (load its checkpoint), not on a fresh one. Zero gradients have no
direction: their cosine is None and is not counted as a conflict."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..adapters.model import AsymLoraModel
from ..adapters.targets import layer_index
from ..errors import InputError
from ..train.batches import IGNORE, Example, collate, encode
from ..train.loop import token_loss_sum
from .metrics import count_conflicts, mean, pairwise_cosines

Batch = dict[str, Tensor]  # as ``train.batches.collate`` makes it
SHARES = {"a": ("A", "hydralora"), "b": ("B", "alora")}  # share -> (shared matrix, method that shares it)


def make_batches(
    tokenizer, examples_by_task: Sequence[Sequence[Example]], batch_size: int = 8, max_length: int = 256
) -> list[list[Batch]]:
    """Task t's examples in padded batches of ``batch_size``, one list per task."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for examples in examples_by_task:
        encoded = [encode(tokenizer, ex, max_length) for ex in examples]
        out.append([collate(encoded[k : k + batch_size], pad_id) for k in range(0, len(encoded), batch_size)])
    return out


def check_sharing(model: AsymLoraModel, share: str, num_tasks: int) -> str:
    """The shared matrix ("A" or "B") of ``model`` under ``share``, or a ValueError saying why not."""
    if share not in SHARES:
        raise InputError(f"share={share!r} must be 'a' (HydraLoRA-shaped) or 'b' (ALoRA-shaped)")
    kind, method = SHARES[share]
    cfg = model.adapter_config
    if cfg.method != method:
        raise InputError(f"share={share!r} needs a {method} adapter (one shared {kind}), not {cfg.method}")
    if num_tasks < 2 or num_tasks > cfg.num_experts:
        raise InputError(f"need 2..{cfg.num_experts} tasks (one per expert), got {num_tasks}")
    return kind


def task_gradients(model: AsymLoraModel, batches: Sequence[Batch], task: int) -> dict[str, dict[str, Tensor]]:
    """Gradient of task ``task``'s mean token loss over ``batches`` (routed to that task) for every
    module's ``lora_A`` (K_a*r, d_in) and ``lora_B`` (d_out, K_b*r): ``{module: {"A": g, "B": g}}``."""
    names = list(model.adapted)
    params = [p for n in names for p in (model.adapted[n].lora_A, model.adapted[n].lora_B)]
    device = params[0].device
    tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["task_ids"] = torch.full_like(batch["task_ids"], task)
            loss = token_loss_sum(model, batch) / max(tokens, 1)
            for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                acc += g
    finally:
        model.train(was_training)
    return {n: {"A": total[2 * k], "B": total[2 * k + 1]} for k, n in enumerate(names)}


def gradient_conflicts(
    model: AsymLoraModel,
    batches_by_task: Sequence[Sequence[Batch]] | Mapping[int, Sequence[Batch]],
    share: str,
) -> dict[str, Any]:
    """Per module: each task's gradient norm on A and on B, the cosine of every two tasks' gradients
    on the shared matrix (A for ``share="a"``, B for ``share="b"``) and how many are negative.

    ``model``: a task-routed hydralora (``share="a"``) or alora (``share="b"``) model, trained for
    some steps. ``batches_by_task``: task id -> batches (as ``make_batches`` makes them); each
    batch is routed to its task whatever its ``task_ids`` say. Returns a JSON-able dict with
    ``modules: [{"module", "layer", "grad_norm_A": [per task], "grad_norm_B": [...],
    "mean_grad_norm_A", "mean_grad_norm_B", "cosines": [[s, t, cos], ...], "conflicts", "pairs"}]``."""
    by_task = (
        dict(batches_by_task) if isinstance(batches_by_task, Mapping) else dict(enumerate(batches_by_task))
    )
    tasks = sorted(by_task)
    kind = check_sharing(model, share, len(tasks))
    if any(not 0 <= t < model.adapter_config.num_experts for t in tasks) or any(
        not by_task[t] for t in tasks
    ):
        raise InputError(f"task ids must be in 0..{model.adapter_config.num_experts - 1}, each with batches")
    grads = {t: task_gradients(model, by_task[t], t) for t in tasks}
    rows = []
    for module in model.adapted:
        norms = {
            k: [float(torch.linalg.norm(grads[t][module][k].flatten())) for t in tasks] for k in ("A", "B")
        }
        cosines = pairwise_cosines({t: grads[t][module][kind] for t in tasks})
        rows.append(
            {
                "module": module,
                "layer": layer_index(module),
                "grad_norm_A": norms["A"],
                "grad_norm_B": norms["B"],
                "mean_grad_norm_A": mean(norms["A"]),
                "mean_grad_norm_B": mean(norms["B"]),
                "cosines": cosines,
                "conflicts": count_conflicts(cosines),
                "pairs": len(cosines),
            }
        )
    return {
        "analysis": "gradients",
        "share": share,
        "shared_matrix": kind,
        "method": model.adapter_config.method,
        "tasks": tasks,
        "total_conflicts": sum(r["conflicts"] for r in rows),
        "total_pairs": sum(r["pairs"] for r in rows),
        "modules": rows,
    }


def compare_sharing(
    make_model: Callable[[str], AsymLoraModel],
    batches_by_task: Sequence[Sequence[Batch]] | Mapping[int, Sequence[Batch]],
) -> dict[str, dict[str, Any]]:
    """``gradient_conflicts`` with A shared and with B shared: ``make_model(method)`` returns the
    (trained) hydralora or alora model. ``{"a": result, "b": result}``."""
    return {
        share: gradient_conflicts(make_model(method), batches_by_task, share)
        for share, (_, method) in SHARES.items()
    }
