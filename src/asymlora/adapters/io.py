"""Adapters on disk: our own folder (``asymlora_config.json`` + ``adapter_model.safetensors``),
export of a plain-LoRA view as a standard PEFT LoRA folder (with a model card), and reading a plain
PEFT LoRA folder back, as a LoRA or as one task's starting point.

The native config has its own file name so that PEFT never mistakes it for one of its own (PEFT
reads ``adapter_config.json``, and its registry already uses the method name ``alora`` for
Activated LoRA). Folders written before that change, with the native config under PEFT's name,
are still read."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import read_json
from ..errors import InputError, MissingFileError
from .config import MAX_SCALE, AdapterConfig, is_anchor
from .layer import MultiLoraLinear
from .model import AsymLoraModel, _model_type

CONFIG_FILE = "asymlora_config.json"
PEFT_CONFIG_FILE = "adapter_config.json"  # PEFT's; also where native configs lived before
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
EXPORT_INFO_FILE = "asymlora_export.json"  # what, from which base, with which scores (machine-readable)
PEFT_PREFIX = "base_model.model."


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


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def _write_folder(
    folder: str | Path, config_file: str, config: dict, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: write_tensors(tensors, tmp, metadata))
    _write_json(folder / config_file, config)
    return folder


def save_adapter(model: AsymLoraModel, folder: str | Path) -> Path:
    """Save the adapters (not the base model) to ``folder``; one of PEFT's own methods
    (peft_anchors.py) as PEFT saves it, beside its asymlora config."""
    if is_anchor(model.adapter_config.method):
        return model.save(folder)
    return _write_folder(
        folder,
        CONFIG_FILE,
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
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {err}"
        ) from None
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise InputError(f"{path}: {bad} holds NaN or infinite values; a damaged file, not weights to use")
    return tensors


def folder_format(folder: str | Path) -> str | None:
    """``"asymlora"`` (a native adapter folder), ``"peft"`` (a PEFT adapter folder) or None."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        return "asymlora"
    shared = folder / PEFT_CONFIG_FILE
    if shared.is_file():
        data = read_json(shared)
        return "peft" if isinstance(data, dict) and "peft_type" in data else "asymlora"
    return None


def native_config_file(folder: str | Path) -> Path:
    """The native config of ``folder``: ``asymlora_config.json``, or ``adapter_config.json`` in folders
    written before the native config had its own name."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file() or folder_format(folder) != "asymlora":
        return folder / CONFIG_FILE
    return folder / PEFT_CONFIG_FILE


def load_adapter(model: nn.Module, folder: str | Path, task: int | None = None) -> AsymLoraModel:
    """Add the adapters saved in ``folder`` to a freshly loaded base ``model``.

    ``folder`` is an asymlora adapter folder or a plain PEFT LoRA folder. A PEFT LoRA loads as a
    ``lora`` adapter; given an ``AsymLoraModel`` and ``task``, it becomes the starting point of that
    task instead (see ``load_peft_lora``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such adapter folder")
    kind = folder_format(folder)
    if kind is None:
        raise MissingFileError(
            f"{folder}: no adapter here: expected {CONFIG_FILE} (asymlora) or {PEFT_CONFIG_FILE} (PEFT)"
        )
    if kind == "peft":
        return load_peft_lora(model, folder, task=task)
    if task is not None:
        raise InputError(
            f"{folder}: task= is for loading a PEFT LoRA into one task; this is an asymlora adapter"
        )
    config_file = native_config_file(folder)
    config = AdapterConfig.load(config_file)
    found = _model_type(model)
    if config.model_type and found and config.model_type != found:
        raise InputError(
            f"{config_file}: this adapter was made for a {config.model_type!r} model, but the model given is "
            f"{found!r}; load it onto the base model it was trained on ({config.base_model_name_or_path})"
        )
    if is_anchor(config.method):
        from .peft_anchors import load_anchor  # PEFT is an optional dependency

        return load_anchor(model, folder, config)
    tensors = read_tensors(folder / WEIGHTS_FILE)
    check_sizes_match(config, tensors, folder)
    try:
        wrapped = AsymLoraModel(model, config)
    except ValueError as err:  # e.g. target_modules that match nothing in this model
        raise InputError(f"{config_file}: {err}") from None
    try:
        wrapped.load_adapter_state_dict(tensors)
    except ValueError as err:
        wrapped.unload()
        raise InputError(f"{folder / WEIGHTS_FILE}: {err}") from None
    return wrapped


# ---------------------------------------------------------------------------------------------
# Plain PEFT LoRA folders in


@dataclass(frozen=True)
class PeftLora:
    """A PEFT LoRA folder's content: one (A, B) per module and the scale of B A."""

    pairs: dict[str, tuple[Tensor, Tensor]]  # module name -> (A: (r, d_in), B: (d_out, r))
    r: int
    scale: float
    dropout: float
    base_model_name_or_path: str | None


def read_peft_lora(folder: str | Path) -> PeftLora:
    """Read a PEFT LoRA folder (safetensors only), refusing what a plain LoRA cannot hold."""
    folder = Path(folder)
    config_file = folder / PEFT_CONFIG_FILE
    config = read_json(config_file)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{config_file}: a {kind} adapter, not a LoRA; only PEFT LoRA folders are read")
    unsupported = {
        "use_dora": "DoRA",
        "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "alora_invocation_tokens": "PEFT's Activated LoRA (aLoRA, alora_invocation_tokens: on only after "
        "its invocation tokens), which is not asymlora's ALoRA (several A's, one shared B), and",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise InputError(f"{config_file}: {what} is not a plain LoRA; asymlora reads plain LoRAs only")
    if config.get("bias", "none") != "none":
        raise InputError(f"{config_file}: bias={config['bias']!r}; asymlora reads LoRAs without bias terms")
    r, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, int | float) or alpha <= 0:
        raise InputError(
            f"{config_file}: needs an integer r >= 1 and lora_alpha > 0, got r={r!r}, lora_alpha={alpha!r}"
        )
    if not (folder / WEIGHTS_FILE).is_file() and any(folder.glob("adapter_model.bin")):
        raise InputError(
            f"{folder}: adapter_model.bin is a pickle; save the adapter with safetensors (PEFT's default)"
        )
    tensors = read_tensors(folder / WEIGHTS_FILE)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        inner = key.removeprefix(PEFT_PREFIX)
        module, _, kind = inner.rpartition(".lora_")
        if not module or kind not in ("A.weight", "B.weight") or tensor.dim() != 2:
            raise InputError(f"{folder / WEIGHTS_FILE}: {key} is not a LoRA A or B weight")
        pairs.setdefault(module, {})[kind[0]] = tensor
    incomplete = sorted(m for m, p in pairs.items() if set(p) != {"A", "B"})
    if not pairs or incomplete:
        raise InputError(
            f"{folder / WEIGHTS_FILE}: no A and B weight for {', '.join(incomplete) or 'any module'}"
        )
    for module, p in pairs.items():
        if p["A"].shape[0] != r or p["B"].shape[1] != r:
            raise InputError(
                f"{folder / WEIGHTS_FILE}: {module} has A {tuple(p['A'].shape)} and B {tuple(p['B'].shape)}, "
                f"not rank r={r} from {config_file.name}"
            )
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if not scale <= MAX_SCALE:  # NaN too
        raise InputError(
            f"{config_file}: lora_alpha={alpha!r} at r={r} gives the scale {scale:.3g}; at most {MAX_SCALE:g} is taken"
        )
    return PeftLora(
        {m: (p["A"], p["B"]) for m, p in sorted(pairs.items())},
        r,
        scale,
        float(config.get("lora_dropout") or 0.0),
        config.get("base_model_name_or_path"),
    )


def load_peft_lora(model: nn.Module, folder: str | Path, task: int | None = None) -> AsymLoraModel:
    """A plain PEFT LoRA folder on ``model``.

    On a base model: a ``lora`` adapter with the same update (same modules, rank and scale). On an
    ``AsymLoraModel`` routed by task, with ``task``: task ``task``'s A and B are set to the LoRA's
    (its update becomes the LoRA's), the starting point for further training of that task. Where B
    is shared by all tasks (ALoRA), the LoRA's B becomes that shared B."""
    folder = Path(folder)
    lora = read_peft_lora(folder)
    if isinstance(model, AsymLoraModel):
        if task is None:
            raise InputError(
                f"{folder}: this model has adapters already; give task= to start that task from the LoRA"
            )
        _set_task_pair(model, lora, task, folder)
        return model
    if task is not None:
        raise InputError(f"{folder}: task= needs a model with task-routed adapters (wrap it first)")
    config = AdapterConfig(
        method="lora",
        r=lora.r,
        alpha=lora.scale * lora.r,
        dropout=lora.dropout,
        target_modules=list(lora.pairs),
        base_model_name_or_path=lora.base_model_name_or_path,
    )
    try:
        wrapped = AsymLoraModel(model, config)
    except ValueError as err:
        raise InputError(f"{folder / WEIGHTS_FILE}: {err}") from None
    missing = sorted(set(lora.pairs) - set(wrapped.adapted))
    state = {f"{m}.lora_{k}": t for m, (a, b) in lora.pairs.items() for k, t in (("A", a), ("B", b))}
    try:
        if missing:
            raise InputError(f"no adaptable module named {', '.join(missing[:5])} in this model")
        wrapped.load_adapter_state_dict(state)
    except ValueError as err:
        wrapped.unload()
        raise InputError(f"{folder / WEIGHTS_FILE}: {err}") from None
    return wrapped


@torch.no_grad()
def _set_task_pair(model: AsymLoraModel, lora: PeftLora, task: int, folder: Path) -> None:
    if set(lora.pairs) != set(model.adapted):
        raise InputError(
            f"{folder}: the LoRA adapts {len(lora.pairs)} modules and this model {len(model.adapted)}; "
            "they must be the same modules (set target_modules to match)"
        )
    for name, (a, b) in lora.pairs.items():
        layer = model.adapted[name]
        if not isinstance(layer, MultiLoraLinear):
            raise InputError(f"{folder}: a factored adapter has no per-task LoRA to start from")
        try:
            t = layer.check_plain_lora(task)
        except ValueError as err:
            raise InputError(f"{folder}: cannot start task {task} from a LoRA: {err}") from None
        if a.shape != (layer.r, layer.d_in) or b.shape != (layer.d_out, layer.r):
            raise InputError(
                f"{folder}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}; this model's task {t} "
                f"needs A {(layer.r, layer.d_in)} and B {(layer.d_out, layer.r)}"
            )
        rows = slice(t * layer.r, (t + 1) * layer.r) if layer.k_a > 1 else slice(None)
        cols = slice(t * layer.r, (t + 1) * layer.r) if layer.k_b > 1 else slice(None)
        layer.lora_A[rows].copy_(a)
        layer.lora_B[:, cols].copy_(b * (lora.scale / layer.scale))  # the same update at this scale


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
    config_file = native_config_file(folder)
    seen = set()
    for name, tensor in tensors.items():
        kind = name.rsplit(".", 1)[-1]
        if kind not in sizes:
            continue
        axis, size = sizes[kind]
        if tensor.dim() != 2 or tensor.shape[axis] != size:
            raise InputError(
                f"{config_file} does not match {folder / WEIGHTS_FILE}: the config "
                f"(method={config.method}, r={config.r}, num_experts={config.num_experts}, d_m={config.d_m}) "
                f"gives {kind} {size} along axis {axis}, but {name} has shape {tuple(tensor.shape)}"
            )
        seen.add(kind)
    missing = sorted(set(sizes) - seen)
    if missing:
        raise InputError(
            f"{folder / WEIGHTS_FILE}: no {', '.join(missing)} tensors: not an adapter of this config"
        )


def peft_export_problem(config: AdapterConfig) -> str | None:
    """Why this adapter has no PEFT LoRA export, or None when it has one (per task where routed)."""
    if is_anchor(config.method):
        return (
            f"{config.method} is one of PEFT's own methods, not a LoRA: the run's adapter/ folder is PEFT's "
            "save_pretrained output already (peft.PeftModel.from_pretrained(base, RUN/adapter) loads it)"
        )
    if config.method == "factored" or config.num_experts == 1 or config.router == "task":
        return None
    default = " (the default router)" if config.router == "softmax" else ""
    return (
        f"the {config.method} adapter mixes its {config.num_experts} experts with the learned "
        f"{config.router} router{default}, so its update depends on each token: it cannot be merged or "
        "exported as a plain LoRA, and no PEFT folder is written. Train with --set adapter.router=task "
        "(one LoRA per task) or --method lora to get one"
    )


EXPORT_FILES = (WEIGHTS_FILE, PEFT_CONFIG_FILE, EXPORT_INFO_FILE, CARD_FILE)


def check_export_folder(folder: str | Path) -> None:
    """Refuse to export into a file, or into a folder that holds anything but an earlier export
    (or only a README.md): its files would be overwritten or mixed with the export's."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(
            f"{folder} is a file, not a folder", hint="choose a new or empty folder for the export"
        )
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()
    other = sorted(names - set(EXPORT_FILES)) or (sorted(names) if names == {CARD_FILE} else [])
    if names and not other and EXPORT_INFO_FILE not in names:  # an adapter asymlora did not export here
        other = sorted(names)
    if other:
        raise InputError(
            f"{folder} holds files that are not an asymlora export ({', '.join(other[:5])}); nothing in it "
            "is touched",
            hint="choose a new or empty folder for the export",
        )


def export_peft(
    model: AsymLoraModel, folder: str | Path, task: int | None = None, card: Mapping[str, Any] | None = None
) -> Path:
    """Write task ``task``'s adapter (B_t A_t) as a PEFT LoRA folder that
    ``peft.PeftModel.from_pretrained(base, folder)`` loads, with a model card (README.md) and
    ``asymlora_export.json``: the method, the task, the base model and where its weights came from,
    and what ``card`` gives: ``{"task": name, "scores": [{task, metric, score, n}], "data": {...},
    "settings": {...}, "license": ID}`` (the license: the base's where known, else "other").
    Raises ValueError where a learned router makes the update token-dependent."""
    from ..models import base_model_record

    cfg = model.adapter_config
    problem = peft_export_problem(cfg)
    if problem:
        raise InputError(problem)
    check_export_folder(folder)
    tensors: dict[str, Tensor] = {}
    for name, layer in model.adapted.items():
        a, b = layer.lora_pair(task)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in model.adapted.values())
    layer = next(iter(model.adapted.values()))
    rank = layer.lora_pair(task)[0].shape[0]  # r, or d_m for a factored adapter
    base = base_model_record(cfg.base_model_name_or_path)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base["base_model_name_or_path"],
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
    info = {
        "producer": "asymlora",
        "method": cfg.method,
        "router": cfg.router,
        "task_id": task,
        **dict(card or {}),
        **base,
        "license": (card or {}).get("license") or base["license"],  # the card's, else the base's
        "rank": rank,
    }
    metadata = {"format": "pt", "producer": "asymlora", "asymlora_base": str(base["asymlora_base"])}
    folder = _write_folder(folder, PEFT_CONFIG_FILE, peft_config, tensors, metadata)
    _write_json(folder / EXPORT_INFO_FILE, info)
    atomic_write(folder / CARD_FILE, lambda tmp: Path(tmp).write_text(model_card(info), encoding="utf-8"))
    return folder


def model_card(info: Mapping[str, Any]) -> str:
    """A Hugging Face style README.md for an exported LoRA: what it is, its base, the data and
    settings it was trained with, its scores, its license field and how to load it."""
    base, task = info["base_model_name_or_path"], info.get("task")
    routed = f", task {task!r} (task id {info['task_id']})" if info.get("task_id") is not None else ""
    lines = ["---", "library_name: peft"]
    if info.get("base_is_hub_id"):
        lines.append(f"base_model: {base}")
    lines += [
        f"license: {info.get('license') or 'other'}",
        "tags: [asymlora, lora]",
        "---",
        "",
        f"# {info['method']} adapter exported as a LoRA{routed}",
        "",
        f"Exported by asymlora from a `{info['method']}` adapter"
        + (f" with the `{info['router']}` router" if info.get("router") else "")
        + f"{routed}, as a plain PEFT LoRA of rank {info['rank']}.",
        "",
        "## Base model",
        "",
        f"- `base_model_name_or_path`: `{base}`",
        f"- provenance: {info['provenance']}",
        "",
        *_card_section("Training data", info.get("data")),
        *_card_section("Training settings", info.get("settings")),
        *_card_scores(info.get("scores") or []),
        "## License",
        "",
        _license_text(info.get("license")),
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        f"model = PeftModel.from_pretrained(base, {'path/to/this/folder'!r})  # base: {info['asymlora_base']}",
        "```",
        "",
        f"With asymlora: `asymlora eval --adapter path/to/this/folder --model {info['asymlora_base']} --task ...`; "
        "with lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=BASE,peft=path/to/this/folder` "
        "(docs/lm-eval.md).",
        "",
    ]
    return "\n".join(lines)


def _card_section(title: str, content: Mapping[str, Any] | None) -> list[str]:
    """A section of the card holding ``content`` as YAML (nothing where there is none)."""
    if not content:
        return []
    import yaml

    return [f"## {title}", "", "```yaml", yaml.safe_dump(dict(content), sort_keys=False).rstrip(), "```", ""]


def _card_scores(scores: list[Mapping[str, Any]]) -> list[str]:
    if not scores:
        return []
    lines = ["## Scores", "", "| task | metric | score | questions |", "|---|---|---|---|"]
    lines += [f"| {s['task']} | {s['metric']} | {s['score']:.2f} | {s.get('n', '-')} |" for s in scores]
    return [*lines, ""]


def _license_text(license_id: str | None) -> str:
    if license_id:
        return (
            f"`license: {license_id}` is the base model's license as recorded where the adapter was exported; "
            "the licenses of the training data may add terms of their own."
        )
    return (
        "`license: other`: the base model's license is not known here. Set this field to what the "
        "licenses of the base model and of the training data allow (`asymlora export --license ID`)."
    )
