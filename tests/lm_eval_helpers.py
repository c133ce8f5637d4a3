"""What the lm-evaluation-harness tests share: a small multiple-choice JSONL task, asymlora's
log-likelihood of each of its choices, and lm-eval's scores and per-choice log-likelihoods read
back from its ``--output_path`` (written with ``--log_samples``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asymlora.data import get_task
from asymlora.data.task import continuation
from asymlora.eval import continuation_logprobs
from asymlora.eval import test_examples as split_examples
from asymlora.eval.scoring import ForwardKwargs

MC_METRICS = ("acc", "acc_norm", "acc_bytes")  # lm-eval's names; asymlora computes the same three
SOUNDS = ["meow", "woof", "moo", "quack"]


def write_sound_questions(path: Path, n: int = 40, word: str = "Animal") -> Path:
    """``n`` questions "<word> i says" with four choices (the test split: 8 of them)."""
    path.write_text("".join(json.dumps({"prompt": f"{word} {i} says", "choices": SOUNDS, "answer": i % 4}) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


def choice_logprobs(
    model, tokenizer, task_file: Path, forward_kwargs: ForwardKwargs | None = None
) -> list[float]:
    """asymlora's log p(choice | prompt) for every choice of the task's test questions, in order."""
    task = get_task(str(task_file))
    questions = split_examples(task)
    prompts = [task.prompt(ex) for ex in questions for _ in ex["choices"]]
    conts = [continuation(c) for ex in questions for c in ex["choices"]]
    return continuation_logprobs(model, tokenizer, prompts, conts, forward_kwargs=forward_kwargs)


def lm_eval_output(out: Path, task_name: str) -> tuple[dict, list[float]]:
    """lm-eval's metrics of ``task_name`` and its log-likelihood of every choice, in question
    order, from the files of one run under ``out``."""
    (results_file,) = out.rglob("results_*.json")
    metrics = json.loads(results_file.read_text())["results"][task_name]
    (samples_file,) = out.rglob(f"samples_{task_name}_*.jsonl")
    return metrics, sample_logprobs([json.loads(line) for line in samples_file.read_text().splitlines()])


def sample_logprobs(samples: list[dict]) -> list[float]:
    """The log-likelihood of every choice, in question order, from lm-eval's logged samples."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [float(resp[0][0]) for s in ordered for resp in s["resps"]]  # the files store them as text


def assert_same_scores(theirs: dict, ours: dict[str, float]) -> None:
    """lm-eval's acc, acc_norm and acc_bytes (fractions) equal asymlora's (in %)."""
    for metric in MC_METRICS:
        assert theirs[f"{metric},none"] * 100 == pytest.approx(ours[metric], abs=1e-9), metric
