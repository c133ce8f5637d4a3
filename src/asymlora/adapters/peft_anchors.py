"""PEFT's own multi-LoRA methods as anchors beside ours, built and run by PEFT itself.

``peft:lily`` (``LilyConfig``) and ``peft:poly`` (``PolyConfig``) go through
``peft.get_peft_model`` on the modules our adapters target; none of their mathematics is written
here. Each is sized to the trainable parameters of the ALoRA that the same adapter settings give
(``anchor_rank``), and wrapped in ``PeftAnchorModel``, which the training loop, the evaluator,
checkpoints and run folders use as they use an ``AsymLoraModel``: it takes ``task_ids`` (Poly
routes by them, Lily has no use for them), counts its trainable parameters with PEFT's own count,
and saves as PEFT saves (``save_pretrained``), beside ``asymlora_config.json``.

Settings (docs/peft-anchors.md says why):
    peft:lily   stride_A = 3 (one A per 3 adapted blocks, per target name), num_B = max(2, ceil(L / 3))
                for L adapted blocks (PEFT's suggested total_layers / 3), scaling 1.0 (PEFT's default)
    peft:poly   n_skills = adapter.num_experts, n_splits = 1 (plain Poly, not MHR), n_tasks = the tasks
    both        r = the smallest rank with at least alora's trainable parameters
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .config import AdapterConfig
from .io import CONFIG_FILE, PEFT_CONFIG_FILE, PEFT_PREFIX
from .model import ParameterCount, check_adapter_state, planned_size, record_base
from .targets import find_target_modules, layer_index

LILY_STRIDE_A = 3


@dataclass(frozen=True)
class Anchor:
    """One of PEFT's methods: its PEFT config for (adapter settings, rank, tasks, the names of the
    modules ``config`` targets), whether its forward takes ``task_ids``, and the PEFT config
    fields that describe its size."""

    make: Callable[[AdapterConfig, int, int | None, list[str]], Any]
    by_task: bool
    settings: tuple[str, ...]


def _lily(config: AdapterConfig, rank: int, n_tasks: int | None, targets: list[str]) -> Any:
    """Lily groups layers by target name, so it gets the config's names (PEFT matches them as
    asymlora does: a suffix, or a regex over the full name) and blocks."""
    from peft import LilyConfig

    blocks = len({layer_index(name) for name in targets})
    return LilyConfig(
        r=rank,
        stride_A=LILY_STRIDE_A,
        num_B=max(2, math.ceil(blocks / LILY_STRIDE_A)),
        target_modules=config.target_modules,
        layers_to_transform=config.layers,
        task_type="CAUSAL_LM",
    )


def _poly(config: AdapterConfig, rank: int, n_tasks: int | None, targets: list[str]) -> Any:
    """Poly's layers stand alone, so it gets the full names of the modules (PolyConfig has no
    layers_to_transform)."""
    from peft import PolyConfig

    if n_tasks is None:
        raise InputError("peft:poly routes by task: build it with the number of tasks (wrap(..., n_tasks=N))")
    return PolyConfig(
        r=rank,
        n_tasks=n_tasks,
        n_skills=config.num_experts,
        n_splits=1,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


ANCHORS = {
    "peft:lily": Anchor(_lily, by_task=False, settings=("r", "stride_A", "num_B", "scaling")),
    "peft:poly": Anchor(_poly, by_task=True, settings=("r", "n_skills", "n_splits", "n_tasks")),
}


def _get_peft_model(model: nn.Module, config: AdapterConfig, rank: int, n_tasks: int | None):
    """PEFT's model of ``config``'s anchor at ``rank`` on ``model``, initialised from ``config.seed``."""
    try:
        from peft import get_peft_model
    except ImportError:
        raise ImportError(
            f"{config.method} runs through PEFT: pip install -e '.[peft]' (tested with peft 0.22.0)"
        ) from None
    targets = list(find_target_modules(model, config.target_modules, config.layers))
    peft_config = ANCHORS[config.method].make(config, rank, n_tasks, targets)
    with torch.random.fork_rng(devices=[]):  # PEFT draws the initial adapter on the CPU
        torch.manual_seed(config.seed)
        try:
            return get_peft_model(model, peft_config)
        except (ValueError, TypeError) as err:  # e.g. GPT-2's Conv1D, which Lily and Poly do not wrap
            raise InputError(f"{config.method}: PEFT cannot build it on this model: {err}") from None


def _trainable_at(model: nn.Module, config: AdapterConfig, rank: int, n_tasks: int | None) -> int:
    """PEFT's count of the anchor's trainable parameters at ``rank``, on a copy of ``model``'s
    architecture on the meta device (no memory, ``model`` untouched)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(model.config)
    return _get_peft_model(shell, config, rank, n_tasks).get_nb_trainable_parameters()[0]


def anchor_rank(model: nn.Module, config: AdapterConfig, n_tasks: int | None = None) -> int:
    """The smallest rank at which ``config``'s anchor has at least the trainable parameters of the
    ALoRA of the same settings on ``model`` (its count is affine in the rank: read at 1 and 2)."""
    goal = planned_size(model, replace(config, method="alora"))
    one, two = (_trainable_at(model, config, r, n_tasks) for r in (1, 2))
    return max(1, 1 + math.ceil((goal - one) / (two - one)))


class PeftAnchorModel(nn.Module):
    """A PEFT model (``peft_model``) called as an ``AsymLoraModel`` is: ``task_ids`` (one per
    example) reach Poly's forward and generate and are not passed to Lily; unknown attributes fall
    through to the transformers model (``config``, ``device``, gradient checkpointing...)."""

    def __init__(self, peft_model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.adapter_config = record_base(config, peft_model.get_base_model())
        self.by_task = ANCHORS[config.method].by_task

    @property
    def base_model(self) -> nn.Module:
        """The transformers model inside (an ``AsymLoraModel``'s ``base_model`` is the same)."""
        return self.peft_model.get_base_model()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def _route(self, task_ids: Tensor | int | list[int] | None) -> dict[str, Tensor]:
        if not self.by_task:
            return {}
        if task_ids is None:
            raise InputError(
                f"{self.adapter_config.method} routes by task: pass task_ids, one per example (asymlora eval "
                "--adapter and generate pass none to it; train and compare score it task by task)"
            )
        return {"task_ids": torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)}

    def forward(self, *args, task_ids: Tensor | int | list[int] | None = None, **kwargs):
        return self.peft_model(*args, **self._route(task_ids), **kwargs)

    def generate(self, *args, task_ids: Tensor | int | list[int] | None = None, **kwargs):
        return self.peft_model.generate(*args, **self._route(task_ids), **kwargs)

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        if self.by_task:  # PEFT's Poly hands task_ids to its layers by hooks that hold only during forward
            raise InputError(
                f"{self.adapter_config.method} cannot recompute its layers in the backward pass (PEFT passes "
                "its task ids only during the forward pass)",
                hint="set train.activation_checkpointing=false",
            )
        self.base_model.gradient_checkpointing_enable(*args, **kwargs)

    activation_checkpointing_enable = gradient_checkpointing_enable

    @property
    def adapted(self) -> dict[str, nn.Module]:
        """PEFT's adapted layers by module name (as ``AsymLoraModel.adapted`` names them)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = self.peft_model.named_modules()
        return {name.removeprefix(PEFT_PREFIX): m for name, m in layers if isinstance(m, BaseTunerLayer)}

    def trainable_parameters(self) -> ParameterCount:
        """PEFT's own count (``get_nb_trainable_parameters``: a weight Lily shares counts once)."""
        return ParameterCount(*self.peft_model.get_nb_trainable_parameters())

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapter's tensors as PEFT saves them (``get_peft_model_state_dict``), detached."""
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(self.peft_model).items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Set the adapter from ``state`` (PEFT's keys, e.g. a checkpoint's); keys and shapes must match."""
        from peft.utils import set_peft_model_state_dict

        check_adapter_state(state, {k: tuple(v.shape) for k, v in self.adapter_state_dict().items()})
        set_peft_model_state_dict(self.peft_model, state)

    def save(self, folder: str | Path) -> Path:
        """PEFT's ``save_pretrained`` (adapter_config.json, adapter_model.safetensors, README.md)
        and the asymlora settings it was made from (asymlora_config.json)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.peft_model.save_pretrained(str(folder))
        self.adapter_config.save(folder / CONFIG_FILE)
        return folder


def wrap_anchor(model: nn.Module, config: AdapterConfig, n_tasks: int | None = None) -> PeftAnchorModel:
    """``config``'s anchor on ``model`` (frozen by PEFT), at ``anchor_rank``; Poly needs ``n_tasks``."""
    rank = anchor_rank(model, config, n_tasks)
    return PeftAnchorModel(_get_peft_model(model, config, rank, n_tasks), config)


def load_anchor(model: nn.Module, folder: Path, config: AdapterConfig) -> PeftAnchorModel:
    """The anchor saved in ``folder`` (by ``PeftAnchorModel.save``) on a fresh base ``model``."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(folder))
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise InputError(f"{folder}: PEFT cannot load this {config.method} adapter: {err}") from None
    return PeftAnchorModel(peft_model, config)


def anchor_settings(folder: str | Path) -> dict[str, Any]:
    """The size settings PEFT recorded for the anchor saved in ``folder`` (its PEFT config fields
    of ``Anchor.settings``), read without PEFT."""
    folder = Path(folder)
    saved = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    method = json.loads((folder / CONFIG_FILE).read_text())["method"]
    return {key: saved.get(key) for key in ANCHORS[method].settings}
