"""Adapters on disk: our own folder (``adapter_config.json`` + ``adapter_model.safetensors``) and
export of a plain-LoRA view as a standard PEFT LoRA folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import InputError, MissingFileError
from .config import AdapterConfig
from .model import AsymLoraModel, _model_type

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder and rename, so a crash leaves the old file.
    The file gets the mode any new file gets (0666 less the umask), not the temp file's 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        give_new_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def give_new_file_mode(path: str | Path) -> None:
    """Set the mode any new file gets (0666 less the umask) on a file that a writer made 0600
    (a temporary file, safetensors' writer)."""
    mask = os.umask(0o022)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_folder_atomically(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build the new content of ``folder`` with ``fill(tmp)`` in ``folder.tmp``, then swap it in by
    renames. A kill at any moment leaves a complete folder at ``folder`` or ``folder.old``
    (``complete_folder`` finds it)."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:  # a full disk, a kill by exception: leave no half-written folder.tmp
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def complete_folder(folder: str | Path, required: Iterable[str]) -> Path | None:
    """``folder`` if it holds every ``required`` file, else ``folder.old`` (left by a kill between the
    renames of ``write_folder_atomically``) if that does, else None."""
    folder = Path(folder)
    required = list(required)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if all((candidate / f).is_file() for f in required):
            return candidate
    return None


def _write_folder(
    folder: str | Path, config: dict, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: write_tensors(tensors, tmp, metadata))
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def save_adapter(model: AsymLoraModel, folder: str | Path) -> Path:
    """Save the adapters (not the base model) to ``folder``."""
    return _write_folder(
        folder,
        model.adapter_config.to_dict(),
        model.adapter_state_dict(),
        {"format": "pt", "producer": "asymlora"},
    )


def write_tensors(
    tensors: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, with the file's mode that of any new file (not 0600) and
    its I/O failures (a full disk) raised as the ``OSError`` they are, naming the file, instead
    of a ``SafetensorError``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(path), metadata=metadata)
        give_new_file_mode(path)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file, turning a missing, truncated or corrupted file into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {err}"
        ) from None


def load_adapter(model: nn.Module, folder: str | Path) -> AsymLoraModel:
    """Add the adapters saved in ``folder`` to a freshly loaded base ``model``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such adapter folder")
    config = AdapterConfig.load(folder / CONFIG_FILE)
    found = _model_type(model)
    if config.model_type and found and config.model_type != found:
        raise InputError(
            f"{folder / CONFIG_FILE}: this adapter was made for a {config.model_type!r} model, but the model given is "
            f"{found!r}; load it onto the base model it was trained on ({config.base_model_name_or_path})"
        )
    tensors = read_tensors(folder / WEIGHTS_FILE)
    check_sizes_match(config, tensors, folder)
    try:
        wrapped = AsymLoraModel(model, config)
    except ValueError as err:  # e.g. target_modules that match nothing in this model
        raise InputError(f"{folder / CONFIG_FILE}: {err}") from None
    try:
        wrapped.load_adapter_state_dict(tensors)
    except ValueError as err:
        wrapped.unload()
        raise InputError(f"{folder / WEIGHTS_FILE}: {err}") from None
    return wrapped


def saved_sizes(config: AdapterConfig) -> dict[str, tuple[int, int]]:
    """(axis, size) that every saved tensor of each kind must have under ``config``: the sizes the
    config sets (rank, experts, d_m), whatever the layer's d_in and d_out."""
    if config.method == "factored":
        return {"lora_A": (0, config.r), "lora_M": (0, config.d_m), "lora_B1": (0, config.r),
                "lora_B2": (1, config.r), "lora_B_base": (1, config.d_m)}  # fmt: skip
    sizes = {"lora_A": (0, config.k_a * config.r), "lora_B": (1, config.k_b * config.r)}
    if config.router in ("softmax", "topk") and config.num_experts > 1:
        sizes["router"] = (0, config.num_experts)
    return sizes


def check_sizes_match(config: AdapterConfig, tensors: Mapping[str, Tensor], folder: Path) -> None:
    """Refuse a config whose rank, expert count or d_m disagrees with the saved tensors before any
    adapter is built: a tampered ``adapter_config.json`` asking for a huge rank would otherwise
    allocate it. The file's own size bounds what a consistent config can ask for."""
    sizes = saved_sizes(config)
    seen = set()
    for name, tensor in tensors.items():
        kind = name.rsplit(".", 1)[-1]
        if kind not in sizes:
            continue
        axis, size = sizes[kind]
        if tensor.dim() != 2 or tensor.shape[axis] != size:
            raise InputError(
                f"{folder / CONFIG_FILE} does not match {folder / WEIGHTS_FILE}: the config "
                f"(method={config.method}, r={config.r}, num_experts={config.num_experts}, d_m={config.d_m}) "
                f"gives {kind} {size} along axis {axis}, but {name} has shape {tuple(tensor.shape)}"
            )
        seen.add(kind)
    missing = sorted(set(sizes) - seen)
    if missing:
        raise InputError(
            f"{folder / WEIGHTS_FILE}: no {', '.join(missing)} tensors: not an adapter of this config"
        )


def export_peft(model: AsymLoraModel, folder: str | Path, task: int | None = None) -> Path:
    """Write task ``task``'s adapter (B_t A_t) as a PEFT LoRA folder that
    ``peft.PeftModel.from_pretrained(base, folder)`` loads. Raises ValueError where a learned router
    makes the update token-dependent."""
    cfg = model.adapter_config
    tensors: dict[str, Tensor] = {}
    for name, layer in model.adapted.items():
        a, b = layer.lora_pair(task)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in model.adapted.values())
    layer = next(iter(model.adapted.values()))
    rank = layer.lora_pair(task)[0].shape[0]  # r, or d_m for a factored adapter
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "r": rank,
        "lora_alpha": layer.scale * rank,  # PEFT's scale is lora_alpha / r
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(model.adapted),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    return _write_folder(folder, peft_config, tensors, {"format": "pt"})
