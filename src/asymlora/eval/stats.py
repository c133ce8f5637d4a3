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

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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

    def as_difference(self) -> dict[str, float | bool]:
        """``as_dict`` plus whether the interval excludes 0 (for differences)."""
        return {**self.as_dict(), "excludes_zero": self.excludes_zero}


def interval_text(interval: Mapping[str, Any], signed: bool = False, mark: bool = False) -> str:
    """``value [low, high]`` of an interval's dict; ``signed`` shows the sign, ``mark`` adds ``*``
    where a difference's interval excludes 0."""
    value = f"{interval['value']:+.1f}" if signed else f"{interval['value']:.1f}"
    star = "*" if mark and interval.get("excludes_zero") else ""
    return f"{value}{star} [{interval['low']:.1f}, {interval['high']:.1f}]"


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


def _check_same_questions(a: Scores, b: Scores) -> None:
    for task in a:
        if task not in b or pooled(a[task]).shape != pooled(b[task]).shape:
            raise ValueError(f"task {task!r}: the two models were not scored on the same questions")


@dataclass(frozen=True, eq=False)
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

    @functools.cached_property
    def _replicates(self) -> dict[str, dict[str, np.ndarray]]:
        """model -> task (and "average") -> its score in every replicate, from one set of draws."""
        first = next(iter(self.models.values()))
        index = draws({t: len(pooled(first[t])) for t in self.tasks}, self.replicates, self.seed)
        out = {}
        for name, scores in self.models.items():
            per_task = {t: pooled(scores[t])[index[t]].mean(1) for t in self.tasks}
            per_task["average"] = np.mean([per_task[t] for t in self.tasks], axis=0)
            out[name] = per_task
        return out

    @functools.cached_property
    def _points(self) -> dict[str, dict[str, float]]:
        """model -> task (and "average") -> its score on the questions as they are."""
        out = {}
        for name, scores in self.models.items():
            points = {t: float(pooled(scores[t]).mean()) for t in self.tasks}
            points["average"] = float(np.mean([points[t] for t in self.tasks]))
            out[name] = points
        return out

    def intervals(self) -> dict[str, dict[str, Interval]]:
        """model -> task (and "average") -> score with its interval."""
        return {
            name: {key: _interval(value, self._replicates[name][key]) for key, value in points.items()}
            for name, points in self._points.items()
        }

    def differences(self, reference: str) -> dict[str, dict[str, Interval]]:
        """model -> task (and "average") -> paired difference model - reference with its interval."""
        if reference not in self.models:
            raise ValueError(f"reference {reference!r} is not one of {', '.join(self.models)}")
        ref_points, ref_reps = self._points[reference], self._replicates[reference]
        return {
            name: {
                key: _interval(value - ref_points[key], self._replicates[name][key] - ref_reps[key])
                for key, value in points.items()
            }
            for name, points in self._points.items()
            if name != reference
        }


def top_answer_share(answers: Sequence[object]) -> float:
    """The share (in %) of the most frequent answer: 100 when a model always gives one answer."""
    if not answers:
        return float("nan")
    _, counts = np.unique(np.asarray([str(a) for a in answers]), return_counts=True)
    return float(100 * counts.max() / len(answers))
