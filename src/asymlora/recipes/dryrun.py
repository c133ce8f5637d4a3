"""``asymlora train --dry-run``: what a run would be, without running it.

The resolved config (as the run's config.yaml would hold it), the trainable parameter count and a
memory estimate for one training step, from the model's shapes alone: the model is built on the
meta device (no weights are loaded) in the run's dtype and wrapped as the run would wrap it. The
config, the tasks' routing, the adapter's ranks and the run folder are checked as the run checks
them, and nothing is written."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..adapters import wrap
from ..adapters.model import ParameterCount, check_ranks_fit
from ..adapters.targets import layer_dims
from ..errors import InputError
from ..federated.comm import meta_model
from ..models import base_weight, loaded_dtype, model_config
from ..runfolder import RunFolder
from ..train import TrainConfig
from .multitask import (
    RESUMABLE,
    MultitaskConfig,
    adapter_ranks,
    check_routing,
    config_dict,
    save_config,
    select_tasks,
)

GIB = 2**30
NOT_COUNTED = "the CUDA context, the allocator's slack, the batch itself and evaluation"


def dry_run(cfg: MultitaskConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """The resolved config, the parameter counts and ``memory_estimate``'s bytes of the run
    ``cfg`` describes, checked as ``multitask.run`` checks it; nothing is loaded or written."""
    RunFolder.open(cfg, save_config, resume=resume, overwrite=overwrite, may_change=RESUMABLE)
    n_tasks = len(select_tasks(cfg.data))
    check_routing(cfg, n_tasks)
    shapes, model = meta_wrapped(cfg, n_tasks)
    count = model.trainable_parameters()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "output_dir": cfg.output_dir,
        "config": config_dict(cfg),
        "trainable_parameters": count.trainable,
        "total_parameters": count.total,
        "processes": processes,
        "memory_bytes": memory_estimate(model, shapes, cfg.train, processes),
        "not_counted": NOT_COUNTED,
    }


def meta_base(model: str, dtype: str):
    """The config of base model ``model`` and the model on the meta device in the dtype it would
    be loaded in (its shapes, no memory, no weights read)."""
    shapes = model_config(model)
    return shapes, meta_model(shapes).to(loaded_dtype(dtype, shapes))


def meta_wrapped(cfg: MultitaskConfig, n_tasks: int):
    """The model's config and the run's wrapped model on the meta device (shapes, no memory),
    its ranks checked against its layers."""
    shapes, base = meta_base(cfg.model, cfg.dtype)
    check_ranks_fit(base, cfg.adapter, adapter_ranks(cfg))
    return shapes, wrap(base, cfg.adapter, n_tasks=n_tasks)


def check_memory(cfg: MultitaskConfig, n_tasks: int, device: Any) -> None:
    """Refuse a run whose training step needs more memory than ``device`` has free, by
    ``memory_estimate`` from the model's shapes, before any weight is loaded or allocated (a model
    folder's config.json of a huge model, a batch of a million examples)."""
    shapes, model = meta_wrapped(cfg, n_tasks)
    check_step_memory(model, shapes, cfg.train, device)


def check_step_memory(model, shapes: Any, train: TrainConfig, device: Any) -> None:
    """``check_memory`` for a wrapped model on the meta device (a federation's largest client)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    need = memory_estimate(model, shapes, train, processes)
    free = free_memory(device)
    if free is not None and need["total"] > free:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f}" for k, v in need.items() if k != "total")
        raise InputError(
            f"one training step needs about {need['total'] / GIB:.1f} GiB ({parts}; train --dry-run shows them), "
            f"more than the {free / GIB:.1f} GiB free on {device}: lower train.batch_size or train.max_length, "
            "raise train.grad_accum, or set train.activation_checkpointing"
        )


def free_memory(device: Any) -> int | None:
    """Bytes free for a run on ``device``: the memory the system can give (MemAvailable) on the
    CPU, the free memory of a CUDA device; None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
    except OSError:
        meminfo = []
    for line in meminfo:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_estimate(model, shapes: Any, train: TrainConfig, processes: int = 1) -> dict[str, int]:
    """Bytes one process holds at the peak of a training step, by arithmetic (docs/performance.md,
    "Memory by arithmetic"): the frozen base weights; the adapters' weights, gradients and AdamW's
    two moments (4 copies, in the adapters' dtype); ``activation_bytes``."""
    params = list(model.parameters())
    base = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    adapters = 4 * sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    activations = activation_bytes(model, shapes, train, processes)
    return {
        "base_weights": base,
        "adapters_and_optimizer": adapters,
        "activations": activations,
        "total": base + adapters + activations,
    }


def activation_bytes(model, shapes: Any, train: TrainConfig, processes: int = 1) -> int:
    """What one micro-batch keeps for the backward pass, every example at ``train.max_length``
    tokens (an upper bound). Per token and block: the two norms' inputs in float32 (8h), q, k, v
    and the attention output (2h + 2h_kv elements), the MLP's gate, up and activation outputs (3m
    elements); per adapted module, its dropout's noise and output (2 d_in elements); the loss's
    float32 (tokens, vocab) tensors (12 V). With activation checkpointing each block keeps only its
    input (h elements) and one block is recomputed at a time. These are a Llama block's tensors
    (docs/performance.md); other architectures keep others (tiny GPT-2 keeps 1.8 times this)."""
    size = base_weight(model).element_size()
    h, layers, heads = shapes.hidden_size, shapes.num_hidden_layers, shapes.num_attention_heads
    m = getattr(shapes, "intermediate_size", None) or getattr(shapes, "n_inner", None) or 4 * h
    h_kv = (getattr(shapes, "num_key_value_heads", None) or heads) * (h // heads)
    tokens = math.ceil(train.batch_size / processes / train.grad_accum) * train.max_length
    block = 8 * h + size * (2 * h + 2 * h_kv + 3 * m)
    adapters = 2 * size * sum(layer_dims(layer.base_layer)[0] for layer in model.adapted.values())
    head = 12 * shapes.vocab_size
    if train.activation_checkpointing:
        return tokens * (layers * size * h + max(head, block + adapters // layers))
    return tokens * (layers * block + adapters + head)


def describe(result: dict[str, Any]) -> str:
    """``dry_run``'s result for people: the config as YAML, the counts, the estimate in GiB."""
    memory, train = result["memory_bytes"], result["config"]["train"]
    per = math.ceil(train["batch_size"] / result["processes"] / train["grad_accum"])
    where = f"per process of {result['processes']}" if result["processes"] > 1 else "one process"
    rows = [
        ("base weights", memory["base_weights"]),
        ("adapters: weights, gradients, AdamW's two moments", memory["adapters_and_optimizer"]),
        (
            f"activations, at most: {per} examples x {train['max_length']} tokens, loss included",
            memory["activations"],
        ),
        ("total", memory["total"]),
    ]
    return "\n".join([
        "resolved config (as the run's config.yaml would hold it):",
        yaml.safe_dump(result["config"], sort_keys=False).rstrip(),
        "",
        str(ParameterCount(result["trainable_parameters"], result["total_parameters"])),
        f"memory of one training step, {where}, by arithmetic from the model's shapes:",
        *(f"  {name:64} {value / GIB:9.3f} GiB" for name, value in rows),
        f"  not counted: {result['not_counted']}",
        f"dry run: nothing written; the run would write {result['output_dir']}",
    ])  # fmt: skip
