"""Answer prompts with a base model and an adapter (a run folder, an asymlora adapter folder or
a PEFT LoRA folder): one by hand, or a JSONL file of them in batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.io import atomic_write
from ..config import ConfigError
from ..data.formats import read_records
from ..data.task import DataFormatError, check_text_length
from ..errors import check_at_least
from ..runfolder import json_line


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


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy (the default), or sampled with ``temperature`` and nucleus
    ``top_p`` from torch's generator seeded with ``seed`` (None: unseeded)."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.do_sample and (self.temperature is not None or self.top_p is not None):
            raise ConfigError(
                "--temperature and --top-p shape sampling: add --do-sample (greedy is the default)"
            )
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature {self.temperature}: give a finite number > 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: give a number in (0, 1]")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"--seed {self.seed}: give a seed >= 0")

    def options(self) -> dict[str, Any]:
        """``model.generate``'s keyword arguments."""
        if not self.do_sample:
            return {"do_sample": False}
        chosen = {"temperature": self.temperature, "top_p": self.top_p}
        return {"do_sample": True, **{k: v for k, v in chosen.items() if v is not None}}


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file, each with a ``prompt`` string (a one-line error names the line)."""
    located = read_records(path)
    for where, item in located:
        if not isinstance(item.get("prompt"), str):
            raise DataFormatError(f'{where}: needs a "prompt" string')
        if "output" in item:
            raise DataFormatError(f'{where}: already has an "output", which the answer would replace')
    return [item for _, item in located]


def generate(
    adapter: str | Path | None,
    prompts: list[str],
    task: str | int | None = None,
    chat: bool = False,
    max_new_tokens: int = 64,
    device: str | None = None,
    dtype: str | None = None,
    model: str | None = None,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
) -> list[str]:
    """The answers to ``prompts`` (each wrapped in the chat template with ``chat``), in order, of a
    base model with ``adapter``: a run folder, an asymlora adapter folder or a PEFT LoRA folder
    (None: the base alone); ``model`` names the base (default: the adapter's own), ``device`` and
    ``dtype`` place it (default: a run's own settings, else auto). Greedy unless ``sampling`` says
    otherwise; ``batch_size`` prompts at a time, left-padded."""
    from ..models import resolve_device
    from .evaluate import load_for_eval

    if device:
        resolve_device(device, "--device")  # checked first, as train checks its device
    check_at_least("max_new_tokens", max_new_tokens, 1)
    check_at_least("batch_size", batch_size, 1)
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise DataFormatError(f"prompt {i} is empty; give the text the model should continue")
        check_text_length(prompt, "prompt", f"prompt {i}")
    if adapter is None and model is None:
        raise ConfigError("give --adapter (a run, adapter or PEFT folder), --model, or both")
    loaded = load_for_eval(model, Path(adapter) if adapter is not None else None, device, dtype)
    task_id = resolve_task(task, task_names(loaded), loaded.router)
    texts = [chat_text(loaded.tokenizer, p, loaded.base) if chat else p for p in prompts]
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        answers += _generate_batch(
            loaded, texts[start : start + batch_size], task_id, chat, max_new_tokens, sampling
        )
    return answers


def task_names(loaded) -> list[str]:
    """The adapter's task names in task-id order; their indices where it does not record them."""
    if loaded.task_names:
        return loaded.task_names
    experts = getattr(getattr(loaded.model, "adapter_config", None), "num_experts", 1)
    return [str(i) for i in range(experts)]


def chat_text(tokenizer, prompt: str, base: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--chat: the tokenizer of {base} has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _generate_batch(loaded, texts: list[str], task_id: int | None, chat: bool, max_new_tokens: int,
                    sampling: Sampling) -> list[str]:  # fmt: skip
    tokenizer, model = loaded.tokenizer, loaded.model
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    on = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        pad = tokenizer.pad_token is None
        if pad:
            tokenizer.pad_token = tokenizer.eos_token
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(on)
    finally:
        tokenizer.padding_side = side
        if pad:
            tokenizer.pad_token = None
    routed = {} if task_id is None else {"task_ids": torch.full((len(texts),), task_id, device=on)}
    with torch.no_grad():
        out = model.generate(**inputs, **routed, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             **sampling.options())  # fmt: skip
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def answer_file(adapter: str | Path | None, prompts: Path, out: Path | None, **options: Any) -> str:
    """Answer every ``prompt`` of a JSONL file (``generate``'s ``options``): each input object, in
    order, with its ``"output"``, as JSONL written atomically to ``out`` (then "" is returned) or
    returned (``out`` None)."""
    items = read_prompts(Path(prompts))
    if out is not None and Path(out).resolve() == Path(prompts).resolve():
        raise ConfigError(f"--out {out}: the prompts file itself; choose another file")
    answers = generate(adapter, [item["prompt"] for item in items], **options)
    text = "".join(json_line({**item, "output": answer}) for item, answer in zip(items, answers, strict=True))
    if out is None:
        return text
    atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return ""
