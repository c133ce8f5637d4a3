"""The training loss reads vocabulary logits only where the targets are (left-padded batches,
``logits_to_keep``); it must equal, value and gradients, the obvious loss over every position of a
right-padded batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asymlora import wrap
from asymlora.train.batches import IGNORE, Example, collate, encode, labelled_tail, length_groups
from asymlora.train.loop import token_loss_sum
from tiny_models import TARGETS, randomize_adapters, tiny_model, tiny_tokenizer

EXAMPLES = [
    Example("Q: a much longer question about cats and dogs?\nA:", " yes", 0),
    Example("Q: short?\nA:", " no", 1),
    Example("Q: medium sized one here\nA:", " a longer target answer", 0),
    Example("x", " y", 1),
]


def right_padded_loss(model, items, pad_id):
    """The reference: right padding, default positions, logits at every position."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id)
    labels = torch.full((len(items), width), IGNORE)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    task_ids = torch.tensor([e.task_id for e in items])
    logits = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["lora", "alora"])
def test_trimmed_left_padded_loss_equals_the_full_right_padded_loss(arch, method):
    torch.manual_seed(0)
    base = tiny_model(arch).double()
    extra = {} if method == "lora" else {"num_experts": 2, "router": "task"}
    model = wrap(base, method=method, r=4, dropout=0.0, target_modules=TARGETS[arch], **extra).double()
    randomize_adapters(model)
    tok = tiny_tokenizer()
    items = [encode(tok, e, max_length=64) for e in EXAMPLES]
    ours = token_loss_sum(model, collate(items, tok.pad_token_id))
    reference = right_padded_loss(model, items, tok.pad_token_id)
    assert abs(ours.item() - reference.item()) < 1e-6 * max(1.0, abs(reference.item()))
    for g_ours, g_ref in zip(grads(model, ours), grads(model, reference), strict=True):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-9)


def test_the_tail_covers_the_longest_target_and_the_logit_before_it():
    tok = tiny_tokenizer()
    items = [encode(tok, e, max_length=64) for e in EXAMPLES]
    batch = collate(items, tok.pad_token_id)
    longest_target = max(sum(label != IGNORE for label in e.labels) for e in items)
    assert labelled_tail(batch["labels"]) == longest_target + 1
    assert (batch["labels"][:, :-longest_target] == IGNORE).all()  # nothing labelled is cut off
    assert labelled_tail(torch.full((2, 5), IGNORE)) == 1  # no target at all: one column, no loss


def test_length_groups_keep_every_item_once_and_bound_the_padding():
    tok = tiny_tokenizer()
    items = [encode(tok, Example("p" * n, " a", 0), max_length=256) for n in (3, 90, 5, 88, 40, 4, 41, 86)]
    groups = length_groups(items)
    assert sorted(id(e) for g in groups for e in g) == sorted(id(e) for e in items)
    for group in groups:
        width = max(len(e.input_ids) for e in group)
        assert sum(len(e.input_ids) for e in group) >= 0.75 * width * len(group)
    assert [len(g) for g in groups] == [5, 3]  # long and middle (22.6% padding), then the short three


def test_a_step_over_length_groups_has_the_gradient_of_the_whole_batch():
    from asymlora.train.loop import Process, TrainConfig, _accumulate

    torch.manual_seed(0)
    model = wrap(
        tiny_model("llama").double(), method="lora", r=4, dropout=0.0, target_modules=TARGETS["llama"]
    )
    model.double()
    randomize_adapters(model)
    tok = tiny_tokenizer()
    items = [encode(tok, e, max_length=64) for e in EXAMPLES]
    assert len(length_groups(items)) > 1
    reference = right_padded_loss(model, items, tok.pad_token_id)
    n_tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in items)
    expected = grads(model, reference / n_tokens)
    mean_loss, balance = _accumulate(
        model, items, TrainConfig(batch_size=4), Process(), tok.pad_token_id, torch.device("cpu")
    )
    assert balance is None  # no balance loss
    assert abs(mean_loss - reference.item() / n_tokens) < 1e-9
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for g_ours, g_ref in zip(got, expected, strict=True):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-12)
