"""Tiny random-init transformers models of the architectures the adapters must support."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128  # the tiny tokenizer's characters fit
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_DECODER)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    ),
}
TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
}


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """The same weights for the same (arch, seed): a 'freshly loaded base'."""
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def batch(n: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed: int = 5, scale: float = 0.3) -> None:
    """Give every adapter tensor (B included, which starts at zero) a random value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def tiny_tokenizer():
    """A character-level tokenizer over printable ASCII (ids 32..126), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {chr(i): i for i in range(32, 127)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_choice_tasks(folder: Path, n: int = 3, size: int = 10) -> list[str]:
    """``n`` small yes/no multiple-choice JSONL task files (one per federated client)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        rows = [
            {"prompt": f"t{k} q{j}:", "choices": ["yes", "no"], "answer": (j + k) % 2} for j in range(size)
        ]
        path = folder / f"task{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths


def cli_process(command: str, overrides: list[str], resume: bool = False) -> subprocess.Popen:
    """``asymlora COMMAND --set ...`` in its own process group (so a test can kill -9 the whole
    group), on one thread, stderr kept for the failure message."""
    args = [sys.executable, "-m", "asymlora.cli", command]
    args += [arg for kv in overrides for arg in ("--set", kv)]
    return subprocess.Popen(
        args + (["--resume"] if resume else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        start_new_session=True,
    )


def lines_in(path: Path) -> int:
    """Number of lines in a JSONL log, 0 while it does not exist."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar under ``folder``: tag -> [(step, value)] (skips without tensorboard)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
