"""Training checkpoints that survive a kill at any moment and resume bit for bit.

A checkpoint is a folder: the adapter (a loadable adapter folder), the optimizer's tensors in
safetensors, and the scalars in JSON. It is written beside the old one and
swapped in by renames, so the last good checkpoint is always readable. No pickle anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..adapters.io import (
    WEIGHTS_FILE,
    complete_folder,
    read_tensors,
    save_adapter,
    write_folder_atomically,
    write_tensors,
)
from ..adapters.model import AsymLoraModel
from ..config import read_json
from ..errors import InputError
from ..runfolder import counted_cpu

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer state into named tensors and JSON-able parameter groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    folder: Path, model: AsymLoraModel, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write the checkpoint folder atomically (a kill leaves the previous one readable)."""

    def fill(tmp: Path) -> None:
        save_adapter(model, tmp)
        opt_tensors, groups = optimizer_tensors(optimizer)
        write_tensors(opt_tensors, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "param_groups": groups}, indent=2))

    return write_folder_atomically(folder, fill)


def find_checkpoint(folder: Path) -> Path | None:
    """The last complete checkpoint at ``folder`` (or its ``.old`` twin), if any. The adapter config
    is not required: only the weights are restored, and its file name changed (asymlora_config.json,
    adapter_config.json before)."""
    return complete_folder(folder, (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE))


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, checked: ``step`` and the per-task ``mixer_counts``
    are non-negative integers, ``param_groups`` a list."""
    path = folder / STATE_FILE
    state = read_json(path)
    counts = state.get("mixer_counts") if isinstance(state, dict) else None
    if not (
        _count(state.get("step") if isinstance(state, dict) else None)
        and isinstance(counts, list)
        and all(_count(c) for c in counts)
        and isinstance(state.get("param_groups"), list)
    ):
        raise InputError(f"{path}: not a trainer state (step, mixer_counts, param_groups)")
    return state


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_checkpoint(folder: Path, model: AsymLoraModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapter and optimizer from ``folder``; return the saved scalar state."""
    state = read_state(folder)
    try:
        model.load_adapter_state_dict(read_tensors(folder / WEIGHTS_FILE))
        restore_optimizer(optimizer, read_tensors(folder / OPTIMIZER_FILE), state.pop("param_groups"))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise InputError(f"{folder}: not a checkpoint of this run ({err})") from None
    return state


def checkpoint_progress(folder: Path) -> tuple[int, float | None] | None:
    """(step, CPU seconds so far) of the last complete checkpoint at ``folder``, None without one
    (a status read: a damaged checkpoint reads as none, and ``train`` refuses it when resuming)."""
    found = find_checkpoint(folder)
    if found is None:
        return None
    try:
        state = read_state(found)
    except InputError:
        return None
    return state["step"], counted_cpu(state.get("cpu_seconds"))
