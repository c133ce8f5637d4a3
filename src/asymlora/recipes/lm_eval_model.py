"""lm-evaluation-harness's ``asymlora`` model: any asymlora adapter (a run folder of ``asymlora
train``, an asymlora adapter folder or a PEFT LoRA folder), routed ones included, scored by
lm-eval on any of its tasks. See docs/lm-eval.md.

lm-eval 0.4.x finds a model name only in its own registry: the models it ships and the classes
that code imported into the same process registers with ``register_model``. It reads no entry
points, and ``--include_path`` adds tasks, not models. Importing this module registers
``asymlora``; ``asymlora lm-eval ARGS`` is lm-eval's own command line (``lm_eval ARGS``) run after
that import. In Python::

    import lm_eval
    import asymlora.recipes.lm_eval_model  # registers "asymlora"
    lm_eval.simple_evaluate(model="asymlora", model_args={"adapter": "runs/my-run"}, tasks=["arc_easy"])

The model is lm-eval's own ``HFLM`` around the model that ``asymlora eval --adapter`` loads
(``load_for_eval``): lm-eval batches, truncates and generates as it does for ``--model hf``. A
softmax- or top-k-routed adapter routes each token by its learned router, as in training; a
task-routed one answers every question with the adapter task that ``task=NAME_OR_INDEX`` names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # an optional extra; the command line says this in one line
    raise ImportError(f"the asymlora model for lm-eval needs lm-evaluation-harness ({err}): "
                      "pip install -e '.[lmeval]' (or pip install lm-eval)") from err  # fmt: skip

from ..errors import UsageError
from ..models import DEVICES, DTYPE_CHOICES
from .evaluate import load_for_eval
from .generate import resolve_task

MODEL_NAME = "asymlora"
OWN_ARGS = ("adapter", "pretrained", "task", "device", "dtype")
# HFLM's options that still apply to a model it is handed (the others load a model: peft, revision,
# parallelize, ...)
HFLM_ARGS = (
    "batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "add_bos_token",
    "prefix_token_id", "softmax_dtype", "mixed_precision_dtype", "think_end_token", "enable_thinking",
    "chat_template_args",
)  # fmt: skip


@register_model(MODEL_NAME)
class AsymloraLM(HFLM):
    """``--model asymlora --model_args adapter=FOLDER[,task=NAME_OR_INDEX][,pretrained=BASE]
    [,dtype=DTYPE]``: the adapter on its base (the base it records, or ``pretrained``), placed by
    lm-eval's ``--device`` and ``dtype`` (default: a run folder's own settings, else auto)."""

    def __init__(
        self,
        adapter: str | None = None,
        pretrained: str | None = None,
        task: str | int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **options: Any,
    ) -> None:
        check_model_args(adapter, device, dtype, options)
        loaded = load_for_eval(
            None if pretrained is None else str(pretrained), Path(str(adapter)),
            device=local_device(device), dtype=dtype,
        )  # fmt: skip
        names = loaded.route_names if loaded.router == "task" else []
        expert = resolve_task(task, names, loaded.router, flag="--model_args task")
        if expert is not None:  # every forward and generate call of this model routes there
            loaded.model.routing.task_ids = torch.tensor(expert)
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **options)
        self.asymlora_info = {
            "adapter": str(adapter),
            "base_model": loaded.base,
            "description": loaded.description,
            "route": None if expert is None else names[expert],
        }

    def get_model_info(self) -> dict:
        return super().get_model_info() | {"asymlora": self.asymlora_info}


def check_model_args(adapter: Any, device: str | None, dtype: str | None, options: dict[str, Any]) -> None:
    """Refuse, before anything loads, a missing adapter, an unknown model arg (lm-eval would
    otherwise drop it without a word) and a device or dtype asymlora cannot place the base on."""
    unknown = sorted(set(options) - set(HFLM_ARGS))
    if unknown:
        raise UsageError(
            f"--model_args {', '.join(unknown)}: not an argument of the asymlora model; it takes "
            f"{', '.join(OWN_ARGS)} and lm-eval's {', '.join(HFLM_ARGS)}"
        )
    if adapter is None:
        raise UsageError(
            "--model_args: give adapter=FOLDER (a run folder of asymlora train, an asymlora adapter folder "
            "or a PEFT LoRA folder), e.g. --model_args adapter=runs/my-run"
        )
    if not Path(str(adapter)).is_dir():
        raise UsageError(f"--model_args adapter={adapter}: no such folder")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise UsageError(f"--model_args dtype={dtype}: choose one of {', '.join(DTYPE_CHOICES)}")
    if device is not None and local_device(device) not in DEVICES:
        raise UsageError(
            f"--device {device}: the asymlora model runs on {', '.join(DEVICES)} (cuda:0 is cuda); "
            "choose another GPU with CUDA_VISIBLE_DEVICES"
        )


def local_device(device: str | None) -> str | None:
    """lm-eval's ``--device`` as an asymlora device setting: its default ``cuda:0`` is ``cuda``."""
    return "cuda" if device == "cuda:0" else device


def run_lm_eval(args: Sequence[str]) -> int:
    """lm-eval's command line on ``args`` with the asymlora model registered; ``--model asymlora``
    and ``--device auto`` where the arguments give no model or device (lm-eval's own defaults,
    ``hf`` and ``cuda:0``, would ignore the adapter and refuse a machine without a GPU)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(args)
    evaluates = bool(args) and args[0] not in ("ls", "validate")  # lm-eval's other commands
    for flag, value in (("--model", MODEL_NAME), ("--device", "auto")):
        if evaluates and not any(a == flag or a.startswith(f"{flag}=") for a in args):
            args += [flag, value]
    saved, sys.argv = sys.argv, ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
