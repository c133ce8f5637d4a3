"""Injection: wrap the target modules of a transformers model, keep the base frozen, route by
task, merge, unload."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..errors import InputError
from .config import AdapterConfig, is_anchor
from .gates import GateBatch, GateStats
from .layer import AdapterLayer, FactoredLoraLinear, MultiLoraLinear, RoutingState
from .targets import find_target_modules, layer_dims


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def record_base(config: AdapterConfig, model: nn.Module) -> AdapterConfig:
    """``config`` with the architecture and name of the base ``model`` filled in where unset."""
    if config.model_type is None:
        config.model_type = _model_type(model)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    return config


class AsymLoraModel(nn.Module):
    """A causal LM with multi-LoRA adapters. Call it like the base model; pass ``task_ids``
    (one per example) when the router is ``task``. Unknown attributes fall through to the base
    model (``model.config``, ``model.device``...)."""

    def __init__(self, model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        if isinstance(model, AsymLoraModel):
            raise InputError("this model already has asymlora adapters; call .unload() first")
        if any(isinstance(m, AdapterLayer) for m in model.modules()):
            raise InputError(
                "this model still holds the adapter layers of an earlier wrap; call .unload() on "
                "that wrapped model first"
            )
        if is_anchor(config.method):
            raise InputError(
                f"{config.method} is built by PEFT: use asymlora.wrap(model, config, n_tasks=...)"
            )
        self.base_model = model
        self.train(model.training)  # new layers follow the model's mode (no dropout in an eval model)
        self.adapter_config = record_base(config, model)
        self.routing = RoutingState()
        model.requires_grad_(False)
        self.adapted: dict[str, AdapterLayer] = {}
        targets = find_target_modules(model, config.target_modules, config.layers)
        layer_class = layer_class_of(config)
        check_adapter_size(model, config, targets)
        for name, module in targets.items():
            layer = layer_class(module, config, name, self.routing).train(module.training)
            _set_submodule(model, name, layer)
            self.adapted[name] = layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    # --- calling --------------------------------------------------------------------------------
    @contextmanager
    def route(self, task_ids: Tensor | int | list[int] | None) -> Iterator[None]:
        """Within the block, task-routed layers use these task ids (one per example, or one for all)."""
        previous = self.routing.task_ids
        self.routing.task_ids = None if task_ids is None else torch.as_tensor(task_ids, dtype=torch.long)
        try:
            yield
        finally:
            self.routing.task_ids = previous

    @contextmanager
    def recording_gates(self, mask: Tensor | None = None, keep_graph: bool = False) -> Iterator[GateBatch]:
        """Within the block, every learned router adds its gates (over the tokens ``mask``
        (batch, seq) marks real) to the ``GateBatch`` this yields; ``keep_graph``: also their
        differentiable usage, for the balance loss."""
        previous, self.routing.gates = self.routing.gates, GateBatch(mask, keep_graph)
        try:
            yield self.routing.gates
        finally:
            self.routing.gates = previous

    def gate_stats(self) -> GateStats | None:
        """An empty ``GateStats`` of the modules with a learned router, None where there is none."""
        config = self.adapter_config
        if not config.learned_router:
            return None
        modules = list(self.adapted)
        return GateStats(modules, config.num_experts, self.adapted[modules[0]].router.device)

    def forward(self, *args, task_ids: Tensor | int | list[int] | None = None, **kwargs):
        with self.route(task_ids if task_ids is not None else self.routing.task_ids):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, task_ids: Tensor | int | list[int] | None = None, **kwargs):
        with self.route(task_ids if task_ids is not None else self.routing.task_ids):
            return self.base_model.generate(*args, **kwargs)

    # --- parameters -----------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Every adapter tensor by ``<module name>.<lora_A|lora_B|router>``, detached."""
        state = {}
        for name, layer in self.adapted.items():
            for pname, param in layer.named_parameters(recurse=False):
                state[f"{name}.{pname}"] = param.detach()
        return state

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.adapter_state_dict().items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` into the adapters; the keys and shapes must match exactly."""
        check_adapter_state(state, self.adapter_shapes())
        for key, value in state.items():
            module_name, _, pname = key.rpartition(".")
            getattr(self.adapted[module_name], pname).copy_(value)

    def trainable_parameters(self) -> ParameterCount:
        params = list(self.parameters())
        return ParameterCount(
            sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
        )

    # --- leaving --------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove the adapters and return the base model with its original modules."""
        for name, layer in self.adapted.items():
            _set_submodule(self.base_model, name, layer.base_layer)
        self.adapted = {}
        return self.base_model

    @torch.no_grad()
    def merge_and_unload(self, task: int | None = None) -> nn.Module:
        """Add task ``task``'s update scale * B_t A_t into each base weight and remove the adapters.
        Only possible where that update is a fixed matrix (LoRA, or task routing)."""
        deltas = {name: layer.delta_weight(task) for name, layer in self.adapted.items()}
        for name, layer in self.adapted.items():
            weight = layer.base_layer.weight
            weight.add_(deltas[name].to(weight.dtype))
        return self.unload()


def layer_class_of(config: AdapterConfig) -> type[AdapterLayer]:
    """The layer class that holds ``config``'s adapter on each target module."""
    return FactoredLoraLinear if config.method == "factored" else MultiLoraLinear


def planned_on(config: AdapterConfig, targets: Mapping[str, nn.Module]) -> int:
    """The numbers ``config``'s adapter would hold on these target modules, known before anything
    is allocated: its trainable parameters (and the factored layer's fixed B_base)."""
    layer_class = layer_class_of(config)
    return sum(layer_class.planned_parameters(config, *layer_dims(m)) for m in targets.values())


def planned_size(model: nn.Module, config: AdapterConfig) -> int:
    """``planned_on`` the modules ``config`` targets in ``model``."""
    return planned_on(config, find_target_modules(model, config.target_modules, config.layers))


def matching_rank(model: nn.Module, config: AdapterConfig, other: AdapterConfig) -> int:
    """The smallest rank at which ``config``'s adapter holds at least as many numbers on ``model``
    as ``other``'s (a parameter-matched baseline: e.g. LoRA raised to ALoRA's trainable size)."""
    goal, rank = planned_size(model, other), 1
    targets = find_target_modules(model, config.target_modules, config.layers)
    while planned_on(replace(config, r=rank), targets) < goal:
        rank += 1
    return rank


def check_adapter_size(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module]) -> None:
    """Refuse, before anything is allocated, an adapter with more numbers than the base model it
    adapts (an adapter is a small addition; r = 10^8 or 10^5 experts would ask for ~100 GB)."""
    planned = planned_on(config, targets)
    base = sum(p.numel() for p in model.parameters())
    if planned > base:
        raise InputError(
            f"adapter config: method={config.method}, r={config.r}, num_experts={config.num_experts}"
            + (f", d_m={config.d_m}" if config.method == "factored" else "")
            + f" on {len(targets)} modules would hold {planned:,} parameters, more than the "
            f"{base:,} of the base model",
            hint="lower adapter.r or adapter.num_experts: an adapter is meant to be small",
        )


def check_ranks_fit(model: nn.Module, config: AdapterConfig, ranks: Mapping[str, int]) -> None:
    """Refuse ranks (by config key: ``{"adapter.r": 8}``) above the smaller dimension of the
    smallest module ``config`` targets: a higher rank adds memory, not expressiveness."""
    targets = find_target_modules(model, config.target_modules, config.layers)
    check_ranks_within(min(min(layer_dims(m)) for m in targets.values()), ranks)


def check_ranks_within(limit: int, ranks: Mapping[str, int]) -> None:
    """Refuse ranks (by name) above ``limit``, the smaller dimension of the smallest target module."""
    over = [f"{key}={rank}" for key, rank in ranks.items() if rank > limit]
    if over:
        raise InputError(
            f"{', '.join(over)}: above {limit}, the smaller dimension of the smallest target module "
            "(a larger rank adds memory, not expressiveness)",
            hint=f"use a rank of at most {limit}",
        )


def check_adapter_state(
    state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str = "adapter"
) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_few(unexpected)}")
    wrong = [
        f"{k} has shape {tuple(state[k].shape)}, expected {expected[k]}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != expected[k]
    ]
    if wrong:
        problems.append("mis-shaped tensors: " + _few(wrong))
    not_float = sorted(k for k in state if not state[k].is_floating_point())
    if not_float:
        problems.append(f"non-float tensors: {_few(not_float)}")
    if problems:
        raise InputError(f"{source} does not fit this model: " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def wrap(model: nn.Module, config: AdapterConfig | None = None, n_tasks: int | None = None, **overrides):
    """Freeze ``model`` and add adapters: ``wrap(model, method="alora", num_experts=3, r=8)``. PEFT's
    own methods (``peft:lily``, ``peft:poly``: peft_anchors.py) are built by PEFT; ``n_tasks``, the
    number of tasks, sizes Poly's task router."""
    if config is None:
        config = AdapterConfig(**overrides)
    elif overrides:
        config = replace(config, **overrides)
    if is_anchor(config.method):
        from .peft_anchors import wrap_anchor  # PEFT is an optional dependency

        return wrap_anchor(model, config, n_tasks)
    return AsymLoraModel(model, config)
