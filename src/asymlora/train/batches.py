"""From (prompt, target, task) examples to padded batches, and which examples each step sees.

The examples of step s are a pure function of (seed, s): a resumed run and every DDP rank draw
exactly the batches an uninterrupted single-process run would."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.task import Example
from ..errors import InputError

IGNORE = -100  # label of tokens that carry no loss (the prompt, the padding)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    task_id: int


def encoded_digest(encoded: Sequence[Sequence[Encoded]]) -> str:
    """A digest of every task's tokenized training examples, in order. A checkpoint records it, so
    that a resume on other data (the examples, the tokenizer or ``max_length`` changed) is refused
    instead of training the rest of the run on something else."""
    digest = hashlib.sha256()
    for task in encoded:
        digest.update(json.dumps([[e.input_ids, e.labels] for e in task]).encode() + b"\n")
    return digest.hexdigest()[:16]


def encode(tokenizer, example: Example, max_length: int) -> Encoded:
    """Prompt tokens (no loss) + target tokens + EOS (loss). A too-long prompt loses its start;
    the target is kept whole where it fits."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target = target + [tokenizer.eos_token_id]
    target = target[:max_length]
    prompt = prompt[max(0, len(prompt) + len(target) - max_length) :]
    return Encoded(prompt + target, [IGNORE] * len(prompt) + target, example.task_id)


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to the longest item, with position ids that count real tokens only: every row's
    target ends at the last column, so the loss needs the LM head only over the last few columns
    (see ``labelled_tail``). The numbers equal those of a right-padded batch."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, width - n :] = torch.tensor(e.input_ids)
        labels[row, width - n :] = torch.tensor(e.labels)
        mask[row, width - n :] = 1
    task_ids = torch.tensor([e.task_id for e in items], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "labels": labels,
        "task_ids": task_ids,
    }


def length_groups(items: Sequence[Encoded], max_padding: float = 0.25) -> list[list[Encoded]]:
    """``items`` split into groups of similar length (longest first), each padded to at most
    ``max_padding`` of its tokens: a batch of short and long prompts does not spend most of its
    compute on padding. The summed loss and its gradient are those of the whole batch."""
    groups: list[list[Encoded]] = []
    for item in sorted(items, key=lambda e: -len(e.input_ids)):
        group = groups[-1] if groups else None
        if group is not None:
            width = len(group[0].input_ids)  # the longest, first in the group
            real = sum(len(e.input_ids) for e in group) + len(item.input_ids)
            if width * (len(group) + 1) * (1 - max_padding) <= real:
                group.append(item)
                continue
        groups.append([item])
    return groups


def labelled_tail(labels: torch.Tensor) -> int:
    """How many last columns of a collated batch the loss reads logits from: the first column
    with a label (never column 0, whose token nothing predicts) up to the end, plus the column
    before it, whose logits predict that first label."""
    has_label = (labels[:, 1:] != IGNORE).any(0)
    if not bool(has_label.any()):
        return 1
    first = 1 + int(has_label.nonzero()[0])
    return labels.shape[1] - first + 1


def task_probabilities(sizes: Sequence[int], temperature: float = 1.0) -> list[float]:
    """Mixing weights: proportional to task size at temperature 1, uniform as it grows
    (p_t ~ n_t^(1/T))."""
    if temperature <= 0:
        raise InputError(f"temperature={temperature} must be > 0")
    weights = [n ** (1.0 / temperature) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class TaskMixer:
    """Which (task, example) pairs each global batch holds. Tasks are drawn per example from
    ``probs`` by a generator seeded with (seed, step); within a task the examples come in a seeded
    order, epoch after epoch. The state is the count drawn per task: save it with a checkpoint."""

    def __init__(self, sizes: Sequence[int], probs: Sequence[float], seed: int) -> None:
        if not sizes or min(sizes) < 1:
            raise InputError(f"every task needs at least one training example, got sizes {list(sizes)}")
        self.sizes, self.probs, self.seed = list(sizes), list(probs), seed
        self.counts = [0] * len(sizes)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _order(self, task: int, epoch: int) -> list[int]:
        key = (task, epoch)
        if key not in self._orders:
            gen = torch.Generator().manual_seed(hash_seed(self.seed, task, epoch))
            self._orders = {k: v for k, v in self._orders.items() if k[0] != task}  # keep one epoch per task
            self._orders[key] = torch.randperm(self.sizes[task], generator=gen).tolist()
        return self._orders[key]

    def _tasks(self, step: int, batch_size: int) -> list[int]:
        gen = torch.Generator().manual_seed(hash_seed(self.seed, -1, step))
        probs = torch.tensor(self.probs, dtype=torch.float64)
        return torch.multinomial(probs, batch_size, replacement=True, generator=gen).tolist()

    def batch(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        picks = []
        for task in self._tasks(step, batch_size):
            epoch, position = divmod(self.counts[task], self.sizes[task])
            picks.append((task, self._order(task, epoch)[position]))
            self.counts[task] += 1
        return picks

    def counts_after(self, steps: int, batch_size: int) -> list[int]:
        """The per-task counts of the first ``steps`` batches (what a checkpoint at ``steps``
        holds when it was written on data of these task sizes)."""
        counts = [0] * len(self.sizes)
        for step in range(steps):
            for task in self._tasks(step, batch_size):
                counts[task] += 1
        return counts


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and processes)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part + 7) % (1 << 63)
    return value


def shard(items: list, rank: int, world_size: int) -> list:
    """This rank's share of a global batch (contiguous, equal sizes)."""
    if len(items) % world_size:
        raise InputError(f"batch size {len(items)} is not divisible by the {world_size} processes")
    per = len(items) // world_size
    return items[rank * per : (rank + 1) * per]
