"""Activation checkpointing for adapter training: keep only each transformer block's input in the
forward pass and recompute the block's activations during the backward pass.

Memory for activations falls from every tensor every block saves to one (tokens, hidden) tensor
per block plus one block's worth during its recompute, for about one extra forward pass of
compute. The base stays frozen and only the adapters train, so the input embeddings' output is
made to require gradients (as PEFT does): every checkpointed block then has an input that needs a
gradient, whichever checkpoint implementation transformers uses. Task-routed adapters read the
batch's task ids during the forward pass; the recompute runs later, in the backward pass, so each
checkpoint replays the task ids its forward saw, and the gate record of learned routers (the
balance loss's), so that the recompute saves the tensors the forward saved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from torch import nn


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation checkpointing of ``model``'s transformer blocks on or off (training mode only:
    evaluation is unaffected). ``model`` is a transformers model or an AsymLoraModel (whose unknown
    attributes are its base model's). Raises a ValueError naming the setting where the architecture
    has no checkpointing."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        if on:
            raise ValueError(
                f"{type(model).__name__} does not support activation checkpointing; "
                "set train.activation_checkpointing=false"
            )
        return
    if is_checkpointing(model):  # off first: a re-wrapped base must replay its new wrapper's routing
        _call(model, "activation_checkpointing_disable", "gradient_checkpointing_disable")
        if getattr(model, "_require_grads_hook", None):
            model.disable_input_require_grads()
    if on:
        options = {"use_reentrant": False}
        if hasattr(model, "routing"):  # an AsymLoraModel
            options["context_fn"] = _routing_replay(model)
        _call(model, "activation_checkpointing_enable", "gradient_checkpointing_enable", options)
        if not getattr(model, "_require_grads_hook", None):  # transformers < 5 leaves it to the caller
            model.enable_input_require_grads()


def _routing_replay(model: nn.Module):
    """torch.utils.checkpoint's ``context_fn``: nothing around the forward pass; around the
    recompute, the task ids that were routing the forward pass and, where the forward pass
    recorded the learned routers' gates, a record like its own (dropped: the forward pass counted
    them), so that the recompute keeps the same tensors for the balance loss's backward."""

    def contexts():
        return nullcontext(), _replay(model, model.routing.task_ids, model.routing.gates)

    return contexts


@contextmanager
def _replay(model: nn.Module, task_ids, gates) -> Iterator[None]:
    with model.route(task_ids):
        if gates is None:
            yield
        else:
            with model.recording_gates(gates.mask, gates.keep_graph):
                yield


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on for ``model`` (False where it has none)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _call(model: nn.Module, name: str, old_name: str, *args) -> None:
    """``model.name(*args)``, or its older name in transformers releases that lack it."""
    method = getattr(model, name, None) or getattr(model, old_name)
    method(*args)
