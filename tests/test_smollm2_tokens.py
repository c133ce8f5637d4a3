"""On the real SmolLM2 tokenizer: the tokens the training loss reads are exactly the tokens that
multiple-choice scoring reads, for prompts and answers shaped like the suites' tasks."""

from __future__ import annotations

import pytest

from asymlora.data.task import PromptTemplate, continuation
from asymlora.eval.scoring import continuation_tokens, prompt_tokens
from asymlora.models import ModelNotAvailableError, load_tokenizer
from asymlora.train.batches import IGNORE, Example, encode

CASES = [  # (template, input, choices), as BIG-bench tasks render them
    (PromptTemplate(), "Was Jackson Pollock straight edge?", ["Yes", "No"]),
    (
        PromptTemplate(prefix="Please answer the following questions.\n\n", input_prefix="", output_prefix="\nThe above reasoning is "),
        "Lily spoke to Donna, breaking her concentration. The 'her' refers to donna.",
        ["correct", "incorrect"],
    ),
    (PromptTemplate(list_choices=True), "Tracy gave money to my friend. What will happen to Tracy?",
     ["Yell at them", "Be disappointed in them", "Lose trust in my friend"]),
    (PromptTemplate(output_prefix="\nA: "), "When does the train leave? It is 3:15 now.", ["3:30 p.m.", "(B) 4 o'clock", "12/31/1999"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return load_tokenizer("smollm2-135m")
    except ModelNotAvailableError as err:
        pytest.skip(f"SmolLM2 is not installed here: {err}")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_training_targets_are_the_scored_continuation_tokens(tokenizer, case):
    template, text, choices = CASES[case]
    prompt = template.render(text, choices)
    assert not prompt.endswith(" ")  # the space belongs to the answer: " Yes" is one word token
    for choice in choices:
        cont = continuation(choice)
        scored_prompt, scored = prompt_tokens(tokenizer, prompt), continuation_tokens(tokenizer, cont)
        encoded = encode(tokenizer, Example(prompt, cont), max_length=1024)
        trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
        assert trained == scored + [tokenizer.eos_token_id]
        assert encoded.input_ids == scored_prompt + scored + [tokenizer.eos_token_id]
        # and the split at the answer is where the tokenizer itself puts it in the joined text
        assert tokenizer(prompt + cont)["input_ids"] == scored_prompt + scored
