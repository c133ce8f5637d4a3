"""The two ways evaluation calls a model: log-likelihood of a continuation, and greedy generation.

``model`` is any causal LM module whose forward takes ``input_ids`` and ``attention_mask`` (plus
whatever ``forward_kwargs(batch_size)`` returns, e.g. ``task_ids`` for an adapter wrapper) and returns
an object with ``.logits`` of shape (batch, seq, vocab). Callers put the model in eval mode and turn
off autograd (see ``asymlora.eval.runner.eval_mode``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from asymlora.models import accepts_keyword

ForwardKwargs = Callable[[int], dict[str, Any]]
"""Extra keyword arguments for ``model(...)`` given the batch size (e.g. per-example task ids)."""


def _no_kwargs(batch_size: int) -> dict[str, Any]:
    return {}


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


def _left_pad(seqs: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, position_ids)``, each (batch, longest); positions count real
    tokens only, so padding changes nothing for models with absolute position embeddings."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device), _positions(mask).to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's tokens as scoring reads them (with the tokenizer's special tokens, if any)."""
    return tokenizer(prompt)["input_ids"]


def continuation_tokens(tokenizer: PreTrainedTokenizerBase, continuation: str) -> list[int]:
    """The continuation's tokens as scoring reads them: tokenized apart from the prompt."""
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


def continuation_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    forward_kwargs: ForwardKwargs | None = None,
) -> list[float]:
    """``log p(continuation | prompt)`` summed over the continuation's tokens, for each pair.

    Prompt and continuation are tokenized apart and joined, so every continuation is scored on the
    same prompt tokens; prompts longer than ``max_length`` lose tokens from the left. Pairs that share
    a prompt (the choices of one question) share one pass over it: the prompt runs once with the
    key/value cache on, and each continuation runs on a copy of that cache. Models that return no
    cache get one left-padded pass per pair instead; both give the same numbers."""
    forward_kwargs = forward_kwargs or _no_kwargs
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    tails = [continuation_tokens(tokenizer, c)[: max_length - 1] for c in continuations]
    shared = []
    for prompt, members in groups.items():
        room = max_length - max(len(tails[i]) for i in members)
        shared.append((prompt_tokens(tokenizer, prompt)[-room:], members))
    shared.sort(key=lambda group: -len(group[0]))
    results = [0.0] * len(prompts)
    for batch in _group_batches(shared, batch_size):
        scores = _score_shared(model, tokenizer, batch, tails, forward_kwargs)
        if scores is None:  # the model keeps no cache: score each pair on its own
            scores = _score_joined(model, tokenizer, batch, tails, forward_kwargs)
        results_for = [i for _, members in batch for i in members]
        for i, score in zip(results_for, scores, strict=True):
            results[i] = score
    return results


Group = tuple[list[int], list[int]]
"""(prompt token ids, indices of the pairs that share that prompt)"""


def _group_batches(groups: Sequence[Group], size: int) -> Iterator[list[Group]]:
    """Consecutive groups with at most ``size`` pairs in all (a larger group goes alone)."""
    batch: list[Group] = []
    for group in groups:
        if batch and sum(len(m) for _, m in batch) + len(group[1]) > size:
            yield batch
            batch = []
        batch.append(group)
    if batch:
        yield batch


def _sum_logprobs(step_logits: torch.Tensor, targets: list[int]) -> float:
    """Sum of log-softmax(step_logits)[t, targets[t]]; step_logits is (len(targets), vocab)."""
    if not targets:
        return 0.0
    logp = step_logits.float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(targets, device=logp.device)[:, None]).sum().item()


def _score_shared(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[Group],
    tails: list[list[int]],
    forward_kwargs: ForwardKwargs,
) -> list[float] | None:
    """Scores of every pair in ``batch`` (in group order), each prompt run once; ``None`` when the
    model returns no key/value cache."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    ids, mask, positions = _left_pad([ctx for ctx, _ in batch], pad, device)
    trim = {"logits_to_keep": 1} if accepts_keyword(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **trim,
                **forward_kwargs(len(batch)))  # fmt: skip
    cache = _returned_cache(out)
    if cache is None or not hasattr(cache[1], "batch_select_indices"):
        return None
    first = out.logits[:, -1]  # (groups, vocab): predicts each continuation's first token
    owner = torch.tensor([g for g, (_, members) in enumerate(batch) for _ in members], device=device)
    rows = [tails[i] for _, members in batch for i in members]
    width = max(1, max(len(t) for t in rows))
    cont = torch.full((len(rows), width), pad, dtype=torch.long)
    cont_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tail in enumerate(rows):
        cont[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
        cont_mask[row, : len(tail)] = 1
    cache[1].batch_select_indices(owner)  # one copy of its prompt's cache per pair
    start = mask.sum(-1)[owner][:, None]  # real prompt tokens before each continuation
    logits = model(
        input_ids=cont.to(device),
        attention_mask=torch.cat([mask[owner], cont_mask.to(device)], dim=1),
        position_ids=start + torch.arange(width, device=device),
        use_cache=True,
        **{cache[0]: cache[1]},
        **forward_kwargs(len(rows)),
    ).logits
    scores = []
    for row, tail in enumerate(rows):
        steps = torch.cat([first[owner[row]][None], logits[row, : max(len(tail) - 1, 0)]])
        scores.append(_sum_logprobs(steps[: len(tail)], tail))
    return scores


def _score_joined(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[Group],
    tails: list[list[int]],
    forward_kwargs: ForwardKwargs,
) -> list[float]:
    """Scores of every pair in ``batch`` (in group order), each prompt + continuation run whole,
    left-padded so all continuations end at the last position (``logits_to_keep`` trims the rest)."""
    device = next(model.parameters()).device
    seqs = [(ctx + tails[i], len(tails[i])) for ctx, members in batch for i in members]
    ids, mask, positions = _left_pad([s for s, _ in seqs], _pad_id(tokenizer), device)
    keep = max(n for _, n in seqs) + 1
    extra = {"logits_to_keep": keep} if accepts_keyword(model, "logits_to_keep") else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra,
                   **forward_kwargs(len(seqs))).logits[:, -keep:]  # fmt: skip
    # logits at position t predict token t + 1: the last n + 1 positions but one
    return [
        _sum_logprobs(logits[row, keep - n - 1 : keep - 1], seq[len(seq) - n :])
        for row, (seq, n) in enumerate(seqs)
    ]


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` without leading whitespace, cut before the first stop string; and whether one was
    found. Leading whitespace is skipped first, so a model that starts with a newline is not cut off."""
    text = text.lstrip()
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def greedy_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 8,
    max_length: int = 1024,
    forward_kwargs: ForwardKwargs | None = None,
) -> list[str]:
    """Greedy continuations, cut at the first stop string or the eos token.

    Batches are left-padded with explicit position ids. The key/value cache is used when the model
    returns one (``past_key_values``); otherwise each step re-runs the whole sequence."""
    forward_kwargs = forward_kwargs or _no_kwargs
    if max_length <= max_new_tokens:
        raise ValueError(
            f"max_length={max_length} leaves no room for the prompt: it must exceed max_new_tokens={max_new_tokens}"
        )
    encoded = [tokenizer(p)["input_ids"][-(max_length - max_new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs = [""] * len(prompts)
    for batch in _batches(order, batch_size):
        texts = _generate_batch(
            model, tokenizer, [encoded[i] for i in batch], max_new_tokens, stop, forward_kwargs
        )
        for i, text in zip(batch, texts, strict=True):
            outputs[i] = text
    return outputs


def _returned_cache(out: Any) -> tuple[str, Any] | None:
    """The key/value cache a forward returned, under its name (``cache`` in transformers >= 5.x,
    ``past_key_values`` before), or ``None``."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return name, value
    return None


def _generate_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    seqs: list[list[int]],
    max_new_tokens: int,
    stop: Sequence[str],
    forward_kwargs: ForwardKwargs,
) -> list[str]:
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    ids, mask, _ = _left_pad(seqs, pad, device)
    trim = {"logits_to_keep": 1} if accepts_keyword(model, "logits_to_keep") else {}
    new = torch.empty((len(seqs), 0), dtype=torch.long, device=device)
    done = torch.zeros(len(seqs), dtype=torch.bool, device=device)
    eos = tokenizer.eos_token_id
    cache, step_ids = None, ids
    for _ in range(max_new_tokens):
        positions = _positions(mask)[:, -step_ids.shape[1] :]
        extra = {cache[0]: cache[1], "use_cache": True} if cache is not None else {}
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, **extra, **trim,
                    **forward_kwargs(len(seqs)))  # fmt: skip
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        new = torch.cat([new, token[:, None]], dim=1)
        if eos is not None:
            done |= token == eos
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        done |= torch.tensor([_cut(t, stop)[1] for t in texts], device=device)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        cache = _returned_cache(out)
        step_ids = token[:, None] if cache is not None else torch.cat([ids, new], dim=1)
    return [_cut(t, stop)[0] for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
