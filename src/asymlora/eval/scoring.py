"""The two ways evaluation calls a model: log-likelihood of a continuation, and greedy generation
(transformers' ``generate``).

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
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

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
    on_batch: Callable[[int], None] | None = None,
) -> list[float]:
    """``log p(continuation | prompt)`` summed over the continuation's tokens, for each pair.

    Prompt and continuation are tokenized apart and joined, so every continuation is scored on the
    same prompt tokens; prompts longer than ``max_length`` lose tokens from the left. Pairs that share
    a prompt (the choices of one question) share one pass over it: the prompt runs once with the
    key/value cache on, and each continuation runs on a copy of that cache. Models that return no
    cache get one left-padded pass per pair instead; both give the same numbers. ``on_batch(n)`` is
    called after each batch of n pairs."""
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
        if on_batch is not None:
            on_batch(len(results_for))
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
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations, cut at the first stop string (after any leading whitespace) or the eos
    token.

    Batches are left-padded. A transformers model (anything with ``generate``, adapter wrappers
    included) runs ``model.generate``, with ``forward_kwargs`` (say ``task_ids``) passed through
    and a stopping criterion that ends each row at its stop string. Any other module is run step
    by step on the whole sequence. ``on_batch(n)`` is called after each batch of n prompts."""
    forward_kwargs = forward_kwargs or _no_kwargs
    if max_length <= max_new_tokens:
        raise ValueError(
            f"max_length={max_length} leaves no room for the prompt: it must exceed max_new_tokens={max_new_tokens}"
        )
    encoded = [prompt_tokens(tokenizer, p)[-(max_length - max_new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    run = _generate_batch if callable(getattr(model, "generate", None)) else _generate_by_forward
    outputs = [""] * len(prompts)
    device, pad = next(model.parameters()).device, _pad_id(tokenizer)
    for batch in _batches(order, batch_size):
        ids, mask, _ = _left_pad([encoded[i] for i in batch], pad, device)
        new = run(model, tokenizer, ids, mask, max_new_tokens, stop, forward_kwargs)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            outputs[i] = _cut(text, stop)[0]
        if on_batch is not None:
            on_batch(len(batch))
    return outputs


def _returned_cache(out: Any) -> tuple[str, Any] | None:
    """The key/value cache a forward returned, under its name (``cache`` in transformers >= 5.x,
    ``past_key_values`` before), or ``None``."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return name, value
    return None


class StopAtAnswerEnd(StoppingCriteria):
    """Ends each row once its new text (leading whitespace skipped) holds a stop string: the rule
    of ``_cut``, which a plain ``stop_strings`` would break for a model that starts with ``\n``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stop, self.start = tokenizer, stop, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([_cut(t, self.stop)[1] for t in texts], device=input_ids.device)


def _generate_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    stop: Sequence[str],
    forward_kwargs: ForwardKwargs,
) -> torch.Tensor:
    """The new tokens of ``model.generate`` (greedy) for one left-padded batch."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    criteria = StoppingCriteriaList([StopAtAnswerEnd(tokenizer, stop, ids.shape[1])]) if stop else None
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                         stopping_criteria=criteria, **forward_kwargs(len(ids)))  # fmt: skip
    return out[:, ids.shape[1] :]


def _generate_by_forward(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    stop: Sequence[str],
    forward_kwargs: ForwardKwargs,
) -> torch.Tensor:
    """Greedy new tokens for a module without ``generate``: the whole sequence runs at each step,
    and a row ends as ``model.generate`` would end it (eos, or ``StopAtAnswerEnd``)."""
    pad, eos = _pad_id(tokenizer), tokenizer.eos_token_id
    at_stop = StopAtAnswerEnd(tokenizer, stop, ids.shape[1])
    seq = ids
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=seq, attention_mask=mask, position_ids=_positions(mask),
                       **forward_kwargs(len(ids))).logits  # fmt: skip
        token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits[:, -1].argmax(-1))
        seq = torch.cat([seq, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        if eos is not None:
            done |= token == eos
        done |= at_stop(seq, None)
        if bool(done.all()):
            break
    return seq[:, ids.shape[1] :]
