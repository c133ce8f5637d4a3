"""A run's report: per-task scores, their average, worst task, spread, and delta-m %."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from asymlora.errors import InputError


@dataclass
class TaskResult:
    """One task's scores (all in [0, 100]); ``score`` is the value of the primary ``metric``."""

    task: str
    kind: str
    metric: str
    score: float
    n: int
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)


def delta_m(scores: Mapping[str, float], references: Mapping[str, float]) -> float:
    """The mean relative change against per-task reference scores, in %:
    ``100 / T * sum_t (score_t - ref_t) / ref_t`` (higher-is-better metrics)."""
    missing = sorted(set(scores) - set(references))
    if missing:
        raise InputError(f"no reference score for: {', '.join(missing)}")
    zero = sorted(t for t in scores if references[t] == 0)
    if zero:
        raise InputError(f"delta-m is undefined with a zero reference score (tasks: {', '.join(zero)})")
    return 100 * statistics.fmean((scores[t] - references[t]) / references[t] for t in scores)


def summarize(scores: Mapping[str, float], references: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Average, worst task, population standard deviation across tasks, and delta-m % when
    ``references`` are given."""
    if not scores:
        raise InputError("no task scores to summarize")
    worst = min(scores, key=scores.__getitem__)
    return {
        "average": statistics.fmean(scores.values()),
        "worst_task": worst,
        "worst": scores[worst],
        "std": statistics.pstdev(scores.values()),
        "delta_m": delta_m(scores, references) if references else None,
    }


@dataclass
class Report:
    results: list[TaskResult]
    references: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> dict[str, float]:
        return {r.task: r.score for r in self.results}

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.scores, self.references)

    def to_dict(self, *, predictions: bool = True) -> dict[str, Any]:
        tasks = [asdict(r) if predictions else {**asdict(r), "predictions": []} for r in self.results]
        return {**self.info, "tasks": tasks, "summary": self.summary, "references": self.references}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def to_markdown(self) -> str:
        """A Markdown table: one row per task with every metric, then the summary lines."""
        lines = ["| task | kind | n | metric | score | other metrics |", "|---|---|---:|---|---:|---|"]
        for r in self.results:
            others = ", ".join(f"{k} {v:.1f}" for k, v in r.metrics.items() if k != r.metric)
            lines.append(f"| {r.task} | {r.kind} | {r.n} | {r.metric} | {_fmt(r.score)} | {others} |")
        s = self.summary
        lines += [
            "",
            f"average {_fmt(s['average'])} | worst {s['worst_task']} {_fmt(s['worst'])} | "
            f"std {_fmt(s['std'])} | delta-m "
            + (f"{s['delta_m']:+.2f}%" if s["delta_m"] is not None else "n/a (no reference scores given)"),
        ]
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"
