"""Generation runs on transformers' ``model.generate``; it gives the same text as the hand-written
greedy loop it replaced (tests/legacy_generation.py), with stop strings, left padding, batching
and task ids passed through to a task-routed adapter."""

from __future__ import annotations

import pytest
import torch

from asymlora import wrap
from asymlora.eval import greedy_generate, task_ids_kwargs
from asymlora.models import load_model
from legacy_generation import legacy_greedy_generate
from tiny_models import randomize_adapters

PROMPTS = [
    "Q: What is 2 plus 2?\nA:",
    "Hi",
    "A much longer prompt, with more tokens in it than the others, to pad the rest:",
    "Name three colours.",
    "x",
]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model_and_tokenizer(request):
    return load_model(request.param, seed=3)


def stops_inside(outputs: list[str]) -> tuple[str, ...]:
    """Stop strings that occur part-way into some free-running outputs, so that generation stops early."""
    return tuple(dict.fromkeys(o[4:6] for o in outputs if len(o.strip()) > 8))[:3]


def test_generate_gives_the_text_of_the_hand_written_loop(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    with torch.no_grad():
        free = legacy_greedy_generate(model, tok, PROMPTS, max_new_tokens=16, stop=(), batch_size=5)
        stops = stops_inside(free)
        assert stops, free
        for stop in [(), ("\n",), stops]:
            for batch_size in (1, 2, 5):
                want = legacy_greedy_generate(
                    model, tok, PROMPTS, max_new_tokens=16, stop=stop, batch_size=batch_size
                )
                got = greedy_generate(
                    model, tok, PROMPTS, max_new_tokens=16, stop=stop, batch_size=batch_size
                )
                assert got == want, (stop, batch_size)
    assert any(len(w) < len(f.lstrip()) for w, f in zip(want, free, strict=True)), "the stop strings cut"


def test_task_ids_reach_a_routed_adapter_through_generate() -> None:
    base, tok = load_model("tiny-llama", seed=3)
    model = wrap(base, method="alora", num_experts=3, router="task", r=4, target_modules=["q_proj", "v_proj"])
    randomize_adapters(model, scale=2.0)
    outputs = []
    with torch.no_grad():
        for task in range(3):
            kwargs = task_ids_kwargs(task)
            want = legacy_greedy_generate(model, tok, PROMPTS, max_new_tokens=10, stop=(), batch_size=2,
                                          forward_kwargs=kwargs)  # fmt: skip
            got = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, stop=(), batch_size=2,
                                  forward_kwargs=kwargs)  # fmt: skip
            assert got == want
            outputs.append(got)
    assert len({tuple(o) for o in outputs}) > 1, "each task's adapter answers differently"
