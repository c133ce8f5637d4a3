"""Answer a prompt with a trained run's adapter, for trying it by hand."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError
from ..errors import check_at_least
from .multitask import load_run


def resolve_task(
    task: str | int | None, names: list[str], router: str | None, flag: str = "--task"
) -> int | None:
    """The task id to route to: required with task routing, meaningless otherwise. ``flag``:
    the command-line flag that gave ``task``, which the errors name."""
    if router != "task":
        if task is not None:
            raise ConfigError(
                f"{flag}: this adapter's router is {router!r}, which does not route by task; leave {flag} out"
            )
        return None
    if task is None:
        raise ConfigError(f"{flag}: this adapter routes by task; choose one of {', '.join(names)}")
    if isinstance(task, int) or str(task).isdigit():
        index = int(task)
        if not 0 <= index < len(names):
            raise ConfigError(f"{flag} {index}: out of range 0..{len(names) - 1} ({', '.join(names)})")
        return index
    if task not in names:
        raise ConfigError(f"{flag} {task!r}: not a task of this run; choose one of {', '.join(names)}")
    return names.index(task)


def generate(
    run_dir: str | Path,
    prompt: str,
    task: str | int | None = None,
    chat: bool = False,
    max_new_tokens: int = 64,
    device: str | None = None,
    dtype: str | None = None,
) -> str:
    """Greedy answer of the run's model to ``prompt`` (wrapped in the chat template with ``chat``);
    ``device`` and ``dtype`` replace the run's own settings."""
    check_at_least("max_new_tokens", max_new_tokens, 1)
    model, tokenizer, cfg, names = load_run(run_dir, device=device, dtype=dtype)
    task_id = resolve_task(task, names, cfg.adapter.router)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"--chat: the tokenizer of {cfg.model} has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    on = next(model.parameters()).device
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(on)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            task_ids=None if task_id is None else torch.tensor([task_id], device=on),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
