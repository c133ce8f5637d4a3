"""The hand-written greedy loop that asymlora.eval.scoring used before generation moved to
transformers' ``model.generate``: kept here, as it was, as the reference that the new code must
reproduce (tests/test_generation.py) and that benchmarks/generation_speed.py times it against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from asymlora.eval.scoring import _batches, _cut, _left_pad, _pad_id, _positions, _returned_cache
from asymlora.models import accepts_keyword


def legacy_greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                           stop: Sequence[str] = ("\n",), batch_size: int = 8, max_length: int = 1024,
                           forward_kwargs=None) -> list[str]:  # fmt: skip
    forward_kwargs = forward_kwargs or (lambda n: {})
    encoded = [tokenizer(p)["input_ids"][-(max_length - max_new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs = [""] * len(prompts)
    for batch in _batches(order, batch_size):
        texts = _legacy_batch(
            model, tokenizer, [encoded[i] for i in batch], max_new_tokens, stop, forward_kwargs
        )
        for i, text in zip(batch, texts, strict=True):
            outputs[i] = text
    return outputs


def _legacy_batch(model, tokenizer, seqs, max_new_tokens, stop, forward_kwargs) -> list[str]:
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
