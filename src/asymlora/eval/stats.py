"""Confidence intervals for comparison tables: a bootstrap over test questions, pooled over seeds,
and paired differences between two models scored on the same questions.

A model's score on a question is its mean over seeds (every seed is scored on the same test
questions: the split does not depend on the training seed). One bootstrap replicate draws, for each
task, as many questions as the task has, with replacement, and the SAME draw serves every model, so a
difference between two models is computed on the same questions (paired). The interval is the
2.5 and 97.5 percentiles of the replicates. The average over tasks resamples each task's questions
on its own (stratified), like the tasks themselves were sampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
REPLICATES = 2000
SEED = 0

Scores = Mapping[str, np.ndarray]
"""One model: per task, the per-question scores in [0, 100], shape (seeds, questions) or (questions,)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def text(self, signed: bool = False) -> str:
        value = f"{self.value:+.1f}" if signed else f"{self.value:.1f}"
        return f"{value} [{self.low:.1f}, {self.high:.1f}]"


def pooled(scores: np.ndarray) -> np.ndarray:
    """Per-question scores averaged over seeds: (seeds, questions) -> (questions,)."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores.mean(0) if scores.ndim == 2 else scores


def draws(sizes: Mapping[str, int], replicates: int = REPLICATES, seed: int = SEED) -> dict[str, np.ndarray]:
    """Per task, the question indices of every replicate: (replicates, questions)."""
    rng = np.random.default_rng(seed)
    return {task: rng.integers(0, n, size=(replicates, n)) for task, n in sizes.items()}


def _interval(point: float, replicates: np.ndarray, level: float = LEVEL) -> Interval:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Interval(float(point), float(low), float(high))


def _task_replicates(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    return pooled(scores)[index].mean(1)


def _check_same_questions(a: Scores, b: Scores) -> None:
    for task in a:
        if task not in b or pooled(a[task]).shape != pooled(b[task]).shape:
            raise ValueError(f"task {task!r}: the two models were not scored on the same questions")


@dataclass(frozen=True)
class Table:
    """Every model's per-task and average scores with intervals, and paired differences against
    one reference model, from one shared set of bootstrap draws."""

    tasks: list[str]
    models: dict[str, Scores]
    replicates: int = REPLICATES
    seed: int = SEED

    def __post_init__(self) -> None:
        first = next(iter(self.models.values()))
        for scores in self.models.values():
            _check_same_questions(first, scores)

    def _draws(self) -> dict[str, np.ndarray]:
        first = next(iter(self.models.values()))
        return draws({t: len(pooled(first[t])) for t in self.tasks}, self.replicates, self.seed)

    def _replicates(self, scores: Scores, index: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        per_task = {t: _task_replicates(scores[t], index[t]) for t in self.tasks}
        per_task["average"] = np.mean([per_task[t] for t in self.tasks], axis=0)
        return per_task

    @staticmethod
    def _points(scores: Scores, tasks: Sequence[str]) -> dict[str, float]:
        points = {t: float(pooled(scores[t]).mean()) for t in tasks}
        points["average"] = float(np.mean([points[t] for t in tasks]))
        return points

    def intervals(self) -> dict[str, dict[str, Interval]]:
        """model -> task (and "average") -> score with its interval."""
        index = self._draws()
        out = {}
        for name, scores in self.models.items():
            reps, points = self._replicates(scores, index), self._points(scores, self.tasks)
            out[name] = {key: _interval(points[key], reps[key]) for key in points}
        return out

    def differences(self, reference: str) -> dict[str, dict[str, Interval]]:
        """model -> task (and "average") -> paired difference model - reference with its interval."""
        if reference not in self.models:
            raise ValueError(f"reference {reference!r} is not one of {', '.join(self.models)}")
        index = self._draws()
        ref_reps, ref_points = (
            self._replicates(self.models[reference], index),
            self._points(self.models[reference], self.tasks),
        )
        out = {}
        for name, scores in self.models.items():
            if name == reference:
                continue
            reps, points = self._replicates(scores, index), self._points(scores, self.tasks)
            out[name] = {
                key: _interval(points[key] - ref_points[key], reps[key] - ref_reps[key]) for key in points
            }
        return out


def top_answer_share(answers: Sequence[object]) -> float:
    """The share (in %) of the most frequent answer: 100 when a model always gives one answer."""
    if not answers:
        return float("nan")
    _, counts = np.unique(np.asarray([str(a) for a in answers]), return_counts=True)
    return float(100 * counts.max() / len(answers))
