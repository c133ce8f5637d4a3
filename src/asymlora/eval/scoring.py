"""The two ways evaluation calls a model: log-likelihood of a continuation, and greedy generation
(transformers' ``generate``).

``model`` is any causal LM module whose forward takes ``input_ids`` and ``attention_mask`` (plus
whatever ``forward_kwargs(batch_size)`` returns, e.g. ``task_ids`` for an adapter wrapper) and returns
an object with ``.logits`` of shape (batch, seq, vocab). Callers put the model in eval mode and turn
off autograd (see ``asymlora.eval.runner.eval_mode``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
    same prompt tokens; prompts longer than ``max_length`` lose tokens from the left. The pairs that
    share a prompt (the choices of one question) are one *question*, and one forward scores it: the
    prompt's tokens, then every distinct prefix of its choices once (a choice's last token is only
    read, never run), each attending to the prompt and to its own earlier tokens through a tree
    attention mask. ``batch_size`` questions run together, longest first; the tokens their prompts
    share at the start run once, and the batch continues from that key/value cache (models that keep
    no cache run the whole prompt in every row; both give the same numbers). Only the positions that
    predict a continuation token get logits.

    The tree needs a model that honours a 4D additive attention mask and ``position_ids``: every
    transformers causal LM does, and so does an adapter wrapper of one (anything with
    ``generate``). Any other module scores each pair in a row of its own, with a plain 2D mask.
    ``on_batch(n)`` is called after each batch of n pairs."""
    forward_kwargs = forward_kwargs or _no_kwargs
    questions = _questions(tokenizer, prompts, continuations, max_length)
    questions.sort(key=lambda q: -q.length)
    results = [0.0] * len(prompts)
    support, pad = _CacheSupport(), _pad_id(tokenizer)
    tree = callable(getattr(model, "generate", None))
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        if tree:
            scored = _score_batch(model, batch, forward_kwargs, support, pad)
        else:
            scored = [_score_alone(model, q, forward_kwargs, pad) for q in batch]
        for question, scores in zip(batch, scored, strict=True):
            for i, score in zip(question.pairs, scores, strict=True):
                results[i] = score
        if on_batch is not None:
            on_batch(sum(len(q.pairs) for q in batch))
    return results


@dataclass
class _Question:
    """One prompt and the continuations scored after it, as a tree of token positions.

    ``nodes[m] = (token, parent)``: a position that runs ``token`` after ``parent`` (another node, or
    -1: the prompt's last token). ``reads[k]`` lists, for the k-th continuation, ``(position, token)``:
    its tokens, each read from the logits at that position."""

    prompt: list[int]
    pairs: list[int]
    nodes: list[tuple[int, int]]
    reads: list[list[tuple[int, int]]]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.nodes)


def _questions(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], continuations: Sequence[str], max_length: int
) -> list[_Question]:
    """The pairs grouped by prompt (first-seen order), each prompt tokenized once and cut from the
    left to leave room for its longest continuation."""
    members: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        members.setdefault(prompt, []).append(i)
    tokens: dict[str, list[int]] = {}
    for text in continuations:
        if text not in tokens:
            tokens[text] = continuation_tokens(tokenizer, text)[: max_length - 1]
    questions = []
    for prompt, pairs in members.items():
        tails = [tokens[continuations[i]] for i in pairs]
        room = max_length - max(len(t) for t in tails)
        nodes, reads = _choice_tree(tails)
        questions.append(_Question(prompt_tokens(tokenizer, prompt)[-room:], pairs, nodes, reads))
    return questions


def _choice_tree(tails: Sequence[list[int]]) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """The positions that the continuations ``tails`` need after their prompt, shared where they
    share a prefix: ``(nodes, reads)`` as in ``_Question``."""
    index: dict[tuple[int, ...], int] = {}
    nodes: list[tuple[int, int]] = []
    reads = []
    for tail in tails:
        where, row = -1, []
        for k, token in enumerate(tail):
            row.append((where, token))
            if k + 1 < len(tail):
                key = tuple(tail[: k + 1])
                if key not in index:
                    index[key] = len(nodes)
                    nodes.append((token, where))
                where = index[key]
        reads.append(row)
    return nodes, reads


SHARED_START_MIN = 4
"""A batch's prompts run their common first tokens once when there are at least this many."""


@dataclass
class _CacheSupport:
    """Whether the model returned a key/value cache that can be copied per row (None: not tried)."""

    works: bool | None = None


def _shared_start(prompts: Sequence[list[int]]) -> int:
    """How many first tokens every prompt shares, leaving each at least its last token."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    for n in range(shortest - 1):
        if any(p[n] != first[n] for p in prompts):
            return n
    return max(shortest - 1, 0)


def _prefix_cache(
    model: nn.Module, tokens: list[int], rows: int, forward_kwargs: ForwardKwargs, support: _CacheSupport
) -> tuple[str, Any] | None:
    """The key/value cache of ``tokens`` (run once), repeated for ``rows`` rows, under the name the
    forward takes it by; ``None`` (and no further tries) for a model that keeps no such cache."""
    if support.works is False:
        return None
    cache = _returned_cache(_run_start(model, tokens, forward_kwargs))
    support.works = cache is not None and hasattr(cache[1], "batch_repeat_interleave")
    if not support.works:
        return None
    cache[1].batch_repeat_interleave(rows)
    return cache


def _run_start(model: nn.Module, tokens: list[int], forward_kwargs: ForwardKwargs) -> Any:
    """The model's output on ``tokens`` alone (one row), its cache kept, only the last logits."""
    ids = torch.tensor([tokens], dtype=torch.long, device=next(model.parameters()).device)
    trim = {"logits_to_keep": 1} if accepts_keyword(model, "logits_to_keep") else {}
    return model(
        input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **trim, **forward_kwargs(1)
    )


def _score_batch(
    model: nn.Module,
    batch: Sequence[_Question],
    forward_kwargs: ForwardKwargs,
    support: _CacheSupport,
    pad: int,
) -> list[list[float]]:
    """Every continuation's score, question by question, from one forward over the batch."""
    shared = _shared_start([q.prompt for q in batch])
    cache = None
    if shared >= SHARED_START_MIN:
        cache = _prefix_cache(model, batch[0].prompt[:shared], len(batch), forward_kwargs, support)
    if cache is None:
        shared = 0
    device = next(model.parameters()).device
    ids, positions, allowed = _tree_rows(batch, shared, pad)
    keep = max(len(q.nodes) for q in batch) + 1
    mask = _additive_mask(allowed, _float_dtype(model))
    extra: dict[str, Any] = {"use_cache": cache is not None}
    if accepts_keyword(model, "logits_to_keep"):
        extra["logits_to_keep"] = keep
    if cache is not None:
        extra[cache[0]] = cache[1]
    logits = model(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                   position_ids=positions.to(device), **extra, **forward_kwargs(len(batch))).logits[:, -keep:]  # fmt: skip
    return _read_scores(logits, batch, keep)


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (what its attention adds a mask in)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, the dtype's lowest value elsewhere: a custom attention mask as
    transformers adds it to the attention scores."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def _tree_rows(batch: Sequence[_Question], shared: int, pad: int) -> tuple[torch.Tensor, ...]:
    """``(input_ids, position_ids, allowed)`` for the batch after its ``shared`` first prompt
    tokens: each row is left-padded and holds the rest of its prompt, then its choice-tree nodes;
    ``allowed[b, i, j]`` says whether column i attends to key j (the shared tokens come first)."""
    width = max(q.length - shared for q in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    allowed = torch.zeros((len(batch), width, shared + width), dtype=torch.bool)
    allowed[:, :, :shared] = True
    for b, q in enumerate(batch):
        rest = q.prompt[shared:]
        start = width - len(rest) - len(q.nodes)
        end = start + len(rest)  # the first node's column
        ids[b, start:end] = torch.tensor(rest, dtype=torch.long)
        positions[b, start:end] = torch.arange(shared, shared + len(rest))
        keys = allowed[b, :, shared:]  # a view: key columns of this row's own tokens
        keys[start:end, start:end] = torch.ones(len(rest), len(rest), dtype=torch.bool).tril()
        keys[range(start), range(start)] = True  # padding attends to itself (and the shared start)
        depth: list[int] = []
        for m, (token, parent) in enumerate(q.nodes):
            col, above = end + m, end - 1 if parent < 0 else end + parent
            depth.append(1 if parent < 0 else depth[parent] + 1)
            ids[b, col] = token
            positions[b, col] = shared + len(rest) - 1 + depth[m]
            keys[col] = keys[above]  # the prompt and every node above it
            keys[col, col] = True
    return ids, positions, allowed


def _score_alone(model: nn.Module, q: _Question, forward_kwargs: ForwardKwargs, pad: int) -> list[float]:
    """A question's scores with each continuation in a row of its own (prompt + continuation,
    left-padded, a 2D mask): for modules that may not honour a tree mask."""
    device = next(model.parameters()).device
    tails = [[token for _, token in read] for read in q.reads]
    ids, mask, positions = _left_pad([q.prompt + tail for tail in tails], pad, device)
    keep = max(len(t) for t in tails) + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   **forward_kwargs(len(tails))).logits[:, -keep:]  # fmt: skip
    logp = logits.float().log_softmax(-1)
    # the logits at column c predict the token at column c + 1: a tail of n tokens is read from the
    # n kept columns before the last
    return [
        float(sum(logp[row, keep - len(tail) - 1 + k, token] for k, token in enumerate(tail)))
        for row, tail in enumerate(tails)
    ]


def _read_scores(logits: torch.Tensor, batch: Sequence[_Question], keep: int) -> list[list[float]]:
    """Sum each continuation's token log-probabilities from the last ``keep`` positions' logits."""
    rows, cols, tokens, owners, counts = [], [], [], [], []
    for b, q in enumerate(batch):
        last = keep - len(q.nodes) - 1  # the kept column of the prompt's last token
        for read in q.reads:
            for where, token in read:
                rows.append(b)
                cols.append(last if where < 0 else last + 1 + where)
                tokens.append(token)
                owners.append(len(counts))
            counts.append(len(read))
    logp = logits.float().log_softmax(-1)[rows, cols, tokens] if rows else logits.new_zeros(0)
    sums = torch.zeros(len(counts), dtype=torch.float32, device=logits.device)
    sums.index_add_(0, torch.tensor(owners, dtype=torch.long, device=logits.device), logp.float())
    flat = sums.tolist()
    scores, at = [], 0
    for q in batch:
        scores.append(flat[at : at + len(q.reads)])
        at += len(q.reads)
    return scores


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

    A transformers model (anything with ``generate``, adapter wrappers included) decodes
    continuously, packed into one sequence (``_PackedDecoder``): ``batch_size`` questions at a time,
    a finished question's place taken at once by the next, the prompts' shared start run once;
    ``forward_kwargs`` (say ``task_ids``) reach every forward. The text equals ``model.generate``'s
    for each question alone. Packing makes every token's attention span all the packed questions:
    where that would cost more than ``PACKED_ATTENTION_SHARE`` of the model's other work (long
    prompts and answers, large batches: ``_packing_pays``), and for a model whose cache is not a
    plain key/value cache (sliding windows, say), ``model.generate`` runs on left-padded batches
    instead, with a stopping criterion that ends each row at its stop string. Any other module is
    run step by step on the whole sequence.
    ``on_batch(n)`` is called as n more prompts are answered."""
    forward_kwargs = forward_kwargs or _no_kwargs
    if max_length <= max_new_tokens:
        raise ValueError(
            f"max_length={max_length} leaves no room for the prompt: it must exceed max_new_tokens={max_new_tokens}"
        )
    encoded = [prompt_tokens(tokenizer, p)[-(max_length - max_new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    transformers_like = callable(getattr(model, "generate", None))
    if transformers_like and _packing_pays(model, encoded, batch_size, max_new_tokens):
        decoder = _PackedDecoder(model, tokenizer, max_new_tokens, stop, forward_kwargs)
        new = decoder.run(encoded, order, batch_size, on_batch)
        if new is not None:
            return [
                _cut(tokenizer.decode(new[i], skip_special_tokens=True), stop)[0] for i in range(len(prompts))
            ]
    run = _generate_batch if transformers_like else _generate_by_forward
    outputs = [""] * len(prompts)
    device, pad = next(model.parameters()).device, _pad_id(tokenizer)
    for batch in _batches(order, batch_size):
        ids, mask, _ = _left_pad([encoded[i] for i in batch], pad, device)
        new_ids = run(model, tokenizer, ids, mask, max_new_tokens, stop, forward_kwargs)
        texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            outputs[i] = _cut(text, stop)[0]
        if on_batch is not None:
            on_batch(len(batch))
    return outputs


PACKED_ATTENTION_SHARE = 0.5
"""Packed decoding is used while its attention over the other packed questions costs at most this
share of the model's per-token work (its parameter count in multiply-adds)."""


def _packing_pays(
    model: nn.Module, encoded: Sequence[list[int]], batch_size: int, max_new_tokens: int
) -> bool:
    """Whether packed decoding is expected to be cheaper than left-padded batches: a packed token
    attends to about ``batch_size`` x (mean prompt + ``max_new_tokens``) keys, each costing two
    multiply-adds per hidden unit in every layer, against the parameters' one per token."""
    config = getattr(model, "config", None) or getattr(getattr(model, "base_model", None), "config", None)
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not (isinstance(hidden, int) and isinstance(layers, int)) or not encoded:
        return False
    keys = min(batch_size, len(encoded)) * (sum(map(len, encoded)) / len(encoded) + max_new_tokens)
    parameters = sum(p.numel() for p in model.parameters())
    return 2 * layers * hidden * keys <= PACKED_ATTENTION_SHARE * parameters


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


@dataclass(eq=False)
class _Decoding:
    """A question being answered: its index, its prompt's length, the tokens generated so far."""

    index: int
    prompt_length: int
    tokens: list[int]

    @property
    def position(self) -> int:
        """The position of the last generated token, the one the next forward runs."""
        return self.prompt_length + len(self.tokens) - 1


SHARED_OWNER = -1
"""The owner of the cache columns every question attends to: the prompts' shared start."""

JOIN_TOKENS = 512
"""At most this many prompt tokens join the decoding in one forward (at least one prompt does)."""


class _PackedDecoder:
    """Greedy decoding of many questions packed into one sequence.

    Every forward runs, as one row, the next token of each question being answered and the prompts
    of the questions that join (up to ``batch_size`` questions at once): a finished question leaves
    at once and the next takes its place in the same forward, so no question waits for the longest
    answer of a batch and no token is padding. A tensor of owners says which question each cached
    key/value column belongs to; the attention mask lets a token see its own question's columns and
    the prompts' shared start (run once, kept once), and the positions are each question's own. So
    each question computes what it would compute alone. A finished question's columns are dropped."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                 stop: Sequence[str], forward_kwargs: ForwardKwargs) -> None:  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.stop, self.forward_kwargs = max_new_tokens, stop, forward_kwargs
        self.device = next(model.parameters()).device
        self.dtype = _float_dtype(model)
        self.select = accepts_keyword(model, "logits_to_keep")
        self.rows: list[_Decoding] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.owner = torch.zeros(0, dtype=torch.long, device=self.device)
        self.shared = 0
        self.cache_name = "past_key_values"  # what the forward calls its cache, as it returns it

    def run(self, encoded: Sequence[list[int]], order: Sequence[int], batch_size: int,
            on_done: Callable[[int], None] | None) -> dict[int, list[int]] | None:  # fmt: skip
        """The new tokens of every question, by index; ``None`` if the model keeps no plain
        key/value cache (nothing has been decoded then)."""
        if not self._run_shared_start([encoded[i] for i in order]):
            return None
        pending, done = list(order), {}
        while pending or self.rows:
            joining = _take(pending, batch_size - len(self.rows), lambda i: len(encoded[i]) - self.shared)
            finished = self._forward([(i, encoded[i][self.shared :]) for i in joining])
            for row in finished:
                done[row.index] = row.tokens
            if on_done is not None and finished:
                on_done(len(finished))
        return done

    def _run_shared_start(self, prompts: Sequence[list[int]]) -> bool:
        """Run the tokens every prompt starts with once (if there are at least
        ``SHARED_START_MIN``); False if the model keeps no plain key/value cache."""
        shared = _shared_start(prompts)
        # too short to be worth sharing: run one token only, to learn whether the cache is plain
        found = _plain_cache(_run_start(self.model, prompts[0][: max(shared, 1)], self.forward_kwargs))
        if found is None:
            return False
        self.cache_name = found[0]
        if shared >= SHARED_START_MIN:
            self.kv, self.shared = found[1], shared
            self.owner = torch.full((shared,), SHARED_OWNER, dtype=torch.long, device=self.device)
        return True

    def _forward(self, joining: Sequence[tuple[int, list[int]]]) -> list[_Decoding]:
        """One forward: the next token of every row and the prompts of the joining questions;
        return the questions that finished."""
        tokens, positions, owners, reads = [], [], [], []
        for row in self.rows:
            tokens.append(row.tokens[-1])
            positions.append(row.position)
            owners.append(row.index)
            reads.append(len(tokens) - 1)
        for index, rest in joining:
            tokens += rest
            positions += range(self.shared, self.shared + len(rest))
            owners += [index] * len(rest)
            reads.append(len(tokens) - 1)
            self.rows.append(_Decoding(index, self.shared + len(rest), []))
        owner = torch.tensor(owners, dtype=torch.long, device=self.device)
        logits = self._run(tokens, positions, owner, reads)
        self.owner = torch.cat([self.owner, owner])
        return self._advance(logits.float().argmax(-1).tolist())

    def _run(
        self, tokens: list[int], positions: list[int], owner: torch.Tensor, reads: list[int]
    ) -> torch.Tensor:
        """The model on the packed tokens after the cached columns: the logits at ``reads``."""
        seen = (self.owner[None, :] == owner[:, None]) | (self.owner[None, :] == SHARED_OWNER)
        order = torch.arange(len(tokens), device=self.device)
        own = (owner[None, :] == owner[:, None]) & (order[None, :] <= order[:, None])
        allowed = torch.cat([seen, own], dim=1)
        mask = _additive_mask(allowed, self.dtype)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        extra: dict[str, Any] = _cache_of(self.kv, self.cache_name) if self.kv else {}
        if self.select:
            extra["logits_to_keep"] = torch.tensor(reads, dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask[None, None],
                         position_ids=torch.tensor([positions], dtype=torch.long, device=self.device),
                         use_cache=True, **extra, **self.forward_kwargs(1))  # fmt: skip
        found = _plain_cache(out)
        if found is None:
            raise RuntimeError("the model returned no plain key/value cache where it returned one before")
        self.cache_name, self.kv = found
        return out.logits[0] if self.select else out.logits[0, reads]

    def _advance(self, tokens: list[int]) -> list[_Decoding]:
        """Append each row's greedy token; take the finished rows (eos, a stop string, or
        ``max_new_tokens``) out, with their cache columns, and return them."""
        finished = []
        for row, token in zip(self.rows, tokens, strict=True):
            if token != self.tokenizer.eos_token_id:
                row.tokens.append(token)
            if (
                token == self.tokenizer.eos_token_id
                or len(row.tokens) >= self.max_new_tokens
                or self._stopped(row)
            ):
                finished.append(row)
        if finished:
            gone = torch.tensor([row.index for row in finished], dtype=torch.long, device=self.device)
            keep = (~torch.isin(self.owner, gone)).nonzero().squeeze(1)
            self.kv = [(k.index_select(2, keep), v.index_select(2, keep)) for k, v in self.kv]
            self.owner = self.owner.index_select(0, keep)
            self.rows = [row for row in self.rows if row not in finished]  # by identity (eq=False)
        return finished

    def _stopped(self, row: _Decoding) -> bool:
        return (
            bool(self.stop)
            and _cut(self.tokenizer.decode(row.tokens, skip_special_tokens=True), self.stop)[1]
        )


def _take(pending: list[int], free: int, length: Callable[[int], int]) -> list[int]:
    """Remove and return the first pending questions that fit: at most ``free`` of them, with at
    most ``JOIN_TOKENS`` prompt tokens (``length`` of a question) in all, but at least one question
    when there is room."""
    taken, tokens = 0, 0
    while taken < min(free, len(pending)) and (taken == 0 or tokens + length(pending[taken]) <= JOIN_TOKENS):
        tokens += length(pending[taken])
        taken += 1
    joining = pending[:taken]
    del pending[:taken]
    return joining


def _plain_cache(out: Any) -> tuple[str, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """The name a forward returned its cache under (and takes it back by), and the (keys, values)
    of each of its layers, each (batch, heads, length, head size); ``None`` for no cache, or one that
    is not a plain full-attention cache."""
    cache = _returned_cache(out)
    if cache is None or not hasattr(cache[1], "layers"):
        return None
    layers = []
    for entry in cache[1]:
        if not isinstance(entry, tuple) or len(entry) < 2 or any(e is not None for e in entry[2:]):
            return None
        keys, values = entry[:2]
        if not (isinstance(keys, torch.Tensor) and keys.dim() == 4):
            return None
        layers.append((keys, values))
    return cache[0], layers


def _cache_of(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], name: str) -> dict[str, Any]:
    """``{name: cache}``: a transformers ``DynamicCache`` holding ``kv``, as a forward's argument."""
    from transformers import DynamicCache

    return {name: DynamicCache(ddp_cache_data=[(k.contiguous(), v.contiguous()) for k, v in kv])}
