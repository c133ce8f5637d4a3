"""Evaluate a model on tasks: the task's kind picks the scoring (choices by log-likelihood, numbers
by greedy generation and exact match, text by greedy generation and ROUGE)."""

from __future__ import annotations

import contextlib
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from asymlora.data.task import Task, continuation
from asymlora.errors import check_at_least
from asymlora.eval.metrics import MC_METRICS, accuracy, extract_number, mc_picks, numbers_equal, rouge
from asymlora.eval.report import Report, TaskResult, questions_digest
from asymlora.eval.scoring import ForwardKwargs, continuation_logprobs, greedy_generate
from asymlora.progress import progress_bar as make_bar


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` (dropout off, in adapters too) and no autograd inside; the previous
    train/eval mode is restored on exit, so a training loop can evaluate mid-run."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def task_ids_kwargs(task_id: int) -> ForwardKwargs:
    """``forward_kwargs`` that pass ``task_ids`` (one id per example) to an adapter wrapper."""

    def kwargs(batch_size: int) -> dict[str, Any]:
        return {"task_ids": torch.full((batch_size,), task_id, dtype=torch.long)}

    return kwargs


SPLITS = ("test", "train", "all")


def test_examples(task: Task, *, split: str = "test", seed: int = 0, limit: int | None = None) -> Dataset:
    """The first ``limit`` examples of a task's (shuffled) split; ``split="all"``: of every example."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    data = task.examples() if split == "all" else task.splits(seed)[split]
    return data.select(range(min(limit, len(data)))) if limit is not None else data


def scored_questions(task: Task, examples: Dataset) -> str:
    """The digest of the questions ``examples`` pose, each with its prompt as the model reads it
    (the task's template included), for pairing runs only on the same questions."""
    return questions_digest([{**row, "prompt": task.prompt(row)} for row in examples.to_list()])


def check_eval_options(limit: int | None, batch_size: int, max_length: int) -> None:
    """Refuse a limit, batch size or context length below 1."""
    check_at_least("batch_size", batch_size, 1)
    check_at_least("max_length", max_length, 1)
    if limit is not None:
        check_at_least("limit", limit, 1)


def evaluate_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Dataset | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    split: str = "test",
    batch_size: int = 8,
    max_length: int = 1024,
    task_id: int | None = None,
    forward_kwargs: ForwardKwargs | None = None,
    progress_bar: bool = True,
) -> TaskResult:
    """Score ``model`` on ``examples`` (default: the task's ``split`` for ``seed``, first ``limit``).

    ``task_id`` passes ``task_ids`` to the forward (adapters routed by task); ``forward_kwargs`` is
    the general hook (batch size -> extra keyword arguments) and wins when both are given. A
    progress bar (stderr, see ``asymlora.progress``) advances per batch: choices scored, or
    questions answered."""
    check_eval_options(limit, batch_size, max_length)
    if examples is None:
        examples = test_examples(task, split=split, seed=seed, limit=limit)
    if forward_kwargs is None and task_id is not None:
        forward_kwargs = task_ids_kwargs(task_id)
    items = sum(len(c) for c in examples["choices"]) if task.kind == "multiple_choice" else len(examples)
    unit = "choice" if task.kind == "multiple_choice" else "question"
    scorer = _score_choices if task.kind == "multiple_choice" else _score_generated
    with eval_mode(model), make_bar(total=items, desc=f"eval {task.name}", unit=unit, leave=False,
                                    enabled=progress_bar) as bar:  # fmt: skip
        options = {"batch_size": batch_size, "max_length": max_length, "forward_kwargs": forward_kwargs,
                   "on_batch": bar.update}  # fmt: skip
        return scorer(model, tokenizer, task, examples, options)


def _score_choices(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, examples: Dataset, options: dict
) -> TaskResult:
    prompts, conts, owners = [], [], []
    for i, ex in enumerate(examples):
        prompt = task.prompt(ex)
        for choice in ex["choices"]:
            prompts.append(prompt)
            conts.append(continuation(choice))
            owners.append(i)
    flat = continuation_logprobs(model, tokenizer, prompts, conts, **options)
    logprobs: list[list[float]] = [[] for _ in examples]
    for owner, lp in zip(owners, flat, strict=True):
        logprobs[owner].append(lp)
    return choice_result(task, examples, mc_picks(logprobs, examples["choices"]))


def choice_result(task: Task, examples: Dataset, picks: Mapping[str, list[int]]) -> TaskResult:
    """A multiple-choice result from the choice each metric picked (``mc_picks``)."""
    answers = examples["answer"]
    metrics = {name: 100 * accuracy(p, answers) for name, p in picks.items()}
    predictions = [
        {"pick": r, "pick_norm": p, "pick_bytes": b, "answer": a, "choice": choices[r]}
        for r, p, b, a, choices in zip(
            picks["acc"], picks["acc_norm"], picks["acc_bytes"], answers, examples["choices"], strict=True
        )  # fmt: skip
    ]
    return TaskResult(task.name, task.kind, "acc", metrics["acc"], len(examples), metrics, predictions,
                      scored_questions(task, examples))  # fmt: skip


def _generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, examples: Dataset, options: dict
) -> list[str]:
    prompts = [task.prompt(ex) for ex in examples]
    return greedy_generate(
        model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop, **options
    )


def _score_generated(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, examples: Dataset, options: dict
) -> TaskResult:
    return generated_result(task, examples, _generate(model, tokenizer, task, examples, options))


def generated_result(task: Task, examples: Dataset, outputs: list[str]) -> TaskResult:
    """A numeric or text task's result from its outputs: by the task's own scorer where it has one,
    else by exact number match (numeric) or ROUGE (text)."""
    if task.score_answer is not None:
        return scored_result(task, examples, outputs)
    return (numeric_result if task.kind == "numeric" else text_result)(task, examples, outputs)


def scored_result(task: Task, examples: Dataset, outputs: list[str]) -> TaskResult:
    """A result from the task's own scorer (``Task.score_answer``), as a percentage per question."""
    assert task.score_answer is not None
    predictions = [
        {"output": out, "targets": ex["targets"], "score": 100 * task.score_answer(out, ex)}
        for out, ex in zip(outputs, examples, strict=True)
    ]
    score = statistics.fmean(p["score"] for p in predictions)
    return TaskResult(task.name, task.kind, "score", score, len(examples), {"score": score}, predictions,
                      scored_questions(task, examples))  # fmt: skip


def numeric_result(task: Task, examples: Dataset, outputs: list[str]) -> TaskResult:
    """A numeric result from the outputs: the extracted number against the targets."""
    predictions = []
    for out, targets in zip(outputs, examples["targets"], strict=True):
        number = extract_number(out, task.answer_position)
        correct = any(numbers_equal(number, t) for t in targets)
        predictions.append({"output": out, "extracted": number, "targets": targets, "correct": correct})
    score = 100 * statistics.fmean(p["correct"] for p in predictions)
    return TaskResult(task.name, task.kind, "exact_match", score, len(examples), {"exact_match": score},
                      predictions, scored_questions(task, examples))  # fmt: skip


def text_result(task: Task, examples: Dataset, outputs: list[str]) -> TaskResult:
    """A text result from the outputs: ROUGE-1 / ROUGE-L F1 against the references."""
    scores = [rouge(out, targets) for out, targets in zip(outputs, examples["targets"], strict=True)]
    metrics = {k: statistics.fmean(s[k] for s in scores) for k in ("rouge1", "rougeL")}
    predictions = [
        {"output": o, "targets": t, **s} for o, t, s in zip(outputs, examples["targets"], scores, strict=True)
    ]
    return TaskResult(task.name, task.kind, "rougeL", metrics["rougeL"], len(examples), metrics, predictions,
                      scored_questions(task, examples))  # fmt: skip


def majority_result(
    task: Task, *, seed: int = 0, limit: int | None = None, split: str = "test"
) -> TaskResult:
    """The majority baseline: every test question gets the task's most frequent training answer.
    Multiple choice: the choice whose text was most often the training answer; where several tie
    (often: choices that never answered a training question), a seeded random one of them, so such
    questions score chance on average. The position of a choice is not used: a model that is not
    shown the choices cannot see it."""
    train = task.splits(seed)["train"]
    examples = test_examples(task, split=split, seed=seed, limit=limit)
    if task.kind == "multiple_choice":
        texts = Counter(choices[a] for choices, a in zip(train["choices"], train["answer"], strict=True))
        rng = random.Random(seed)
        picks = []
        for choices in examples["choices"]:
            top = max(texts[c] for c in choices)
            picks.append(rng.choice([i for i, c in enumerate(choices) if texts[c] == top]))
        return choice_result(task, examples, dict.fromkeys(MC_METRICS, picks))
    most_common = Counter(targets[0] for targets in train["targets"]).most_common(1)[0][0]
    return generated_result(task, examples, [most_common] * len(examples))


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    *,
    task_ids: Mapping[str, int] | None = None,
    references: Mapping[str, float] | None = None,
    progress: Callable[[TaskResult], None] | None = None,
    **options: Any,
) -> Report:
    """Evaluate every task (``options`` go to ``evaluate_task``); ``task_ids`` maps a task name to
    the adapter id routed to it; ``references`` enable delta-m."""
    results = []
    for task in tasks:
        task_id = task_ids.get(task.name) if task_ids else None
        result = evaluate_task(model, tokenizer, task, task_id=task_id, **options)
        results.append(result)
        if progress is not None:
            progress(result)
    return Report(results, dict(references) if references else None)


def majority_report(
    tasks: Sequence[Task], *, seed: int = 0, limit: int | None = None, split: str = "test"
) -> Report:
    """The majority baseline of every task, on the same questions as ``evaluate_tasks``."""
    return Report([majority_result(task, seed=seed, limit=limit, split=split) for task in tasks])
