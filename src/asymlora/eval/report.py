"""A run's report: per-task scores, their average, worst task, spread, and delta-m %."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asymlora.errors import InputError

from .stats import Table, interval_text, top_answer_share


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
    questions: str = ""  # digest of the scored questions, in order (``questions_digest``); "" if unknown


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
    majority: Report | None = None  # the majority-answer baseline on the same questions, if known

    @property
    def scores(self) -> dict[str, float]:
        return {r.task: r.score for r in self.results}

    @property
    def summary(self) -> dict[str, Any]:
        return summarize(self.scores, self.references)

    def to_dict(self, *, predictions: bool = True) -> dict[str, Any]:
        tasks = [asdict(r) if predictions else {**asdict(r), "predictions": []} for r in self.results]
        out = {**self.info, "tasks": tasks, "summary": self.summary, "references": self.references}
        stats = self.statistics()
        if stats is not None:
            out["statistics"] = stats
        return out

    def statistics(self) -> dict[str, Any] | None:
        """95 % intervals per task and on the average, the share of the most frequent answer, and
        (with ``majority``) the majority baseline and the paired difference against it; None where
        the results hold no per-question predictions."""
        if not all(r.predictions for r in self.results):
            return None
        entries = [asdict(r) for r in self.results]
        names = [r.task for r in self.results]
        models = {"model": {e["task"]: np.array(question_scores(e)) for e in entries}}
        if self.majority is not None:
            models["majority answer"] = {
                r.task: np.array(question_scores(asdict(r))) for r in self.majority.results
            }
        table = Table(names, models)
        ci = table.intervals()
        out = {
            "intervals": {k: iv.as_dict() for k, iv in ci["model"].items()},
            "top_answer_share": {e["task"]: most_frequent_answer_share(e) for e in entries},
        }
        if self.majority is not None:
            out["majority_answer"] = {k: iv.as_dict() for k, iv in ci["majority answer"].items()}
            diffs = table.differences("majority answer")["model"]
            out["difference_vs_majority"] = {k: iv.as_difference() for k, iv in diffs.items()}
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def to_markdown(self) -> str:
        """A Markdown table: one row per task with every metric (the score with its 95 % interval,
        the majority baseline and the share of the most frequent answer where known), then the
        summary lines."""
        stats = self.statistics()
        extra = ["95 % interval", "top answer %"] if stats else []
        if stats and "majority_answer" in stats:
            extra += ["majority answer", "vs majority (paired)"]
        head = ["task", "kind", "n", "metric", "score", *extra, "other metrics"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.results:
            cells = [r.task, r.kind, str(r.n), r.metric, _fmt(r.score)]
            if stats:
                cells += [_span(stats["intervals"][r.task]), f"{stats['top_answer_share'][r.task]:.0f}"]
                if "majority_answer" in stats:
                    cells += [
                        _fmt(stats["majority_answer"][r.task]["value"]),
                        interval_text(stats["difference_vs_majority"][r.task], signed=True, mark=True),
                    ]
            cells.append(", ".join(f"{k} {v:.1f}" for k, v in r.metrics.items() if k != r.metric))
            lines.append("| " + " | ".join(cells) + " |")
        s = self.summary
        average = f"average {_fmt(s['average'])}"
        if stats:
            average += f" {_span(stats['intervals']['average'])}"
            if "majority_answer" in stats:
                average += f" (majority answer {_fmt(stats['majority_answer']['average']['value'])}; "
                average += f"difference {interval_text(stats['difference_vs_majority']['average'], signed=True, mark=True)})"
        lines += [
            "",
            f"{average} | worst {s['worst_task']} {_fmt(s['worst'])} | "
            f"std {_fmt(s['std'])} | delta-m "
            + (f"{s['delta_m']:+.2f}%" if s["delta_m"] is not None else "n/a (no reference scores given)"),
        ]
        if stats:
            lines.append(
                "Intervals: 95 %, bootstrap over the test questions; the difference against the majority "
                "answer is paired (same questions); * marks an interval that excludes 0."
            )
        return "\n".join(lines)


def _span(interval: Mapping[str, float]) -> str:
    return f"[{interval['low']:.1f}, {interval['high']:.1f}]"


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def questions_digest(rows: Sequence[Mapping[str, Any]]) -> str:
    """A short digest of the questions a task was scored on, in order (every field of each row:
    for a scored task, the prompt as the model reads it, choices, answer or targets). Two runs are
    compared question by question only when their digests agree: a count alone would pair the
    questions of two different test splits."""
    text = json.dumps(list(rows), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_same_questions(entries: Mapping[str, Mapping[str, Any]]) -> None:
    """``entries``: a label (``lora, seed 1``) -> one task's entry of a results.json. Refuse,
    naming two of them, entries scored on different questions: different digests, or (entries
    written before digests were kept) different numbers of questions."""
    labels = list(entries)
    for label in labels[1:]:
        a, b = entries[labels[0]], entries[label]
        both_digests = a.get("questions") and b.get("questions")
        if (a["questions"] != b["questions"]) if both_digests else a.get("n") != b.get("n"):
            raise InputError(
                f"task {b['task']!r}: {labels[0]} and {label} were scored on different questions "
                "(the task's data or its split changed between them); restore the data they were scored on, or "
                "remove the folders of the runs scored on the old data so that they run again"
            )


def question_scores(task: Mapping[str, Any]) -> list[float]:
    """A task's per-question scores in [0, 100] from its entry in results.json (the primary
    metric: raw-pick accuracy, numeric exact match, or ROUGE-L)."""
    predictions, metric = task["predictions"], task["metric"]
    if not predictions:
        raise ValueError(f"task {task['task']!r}: results.json holds no per-question predictions")
    if metric == "acc":
        return [100.0 * (p["pick"] == p["answer"]) for p in predictions]
    if metric == "exact_match":
        return [100.0 * bool(p["correct"]) for p in predictions]
    return [float(p[metric]) for p in predictions]


def given_answers(task: Mapping[str, Any]) -> list[Any]:
    """The answer the model gave to each question: the picked choice's text (its index in results
    written before the text was kept), the extracted number, or the generated text."""
    key = {"acc": "choice", "exact_match": "extracted"}.get(task["metric"], "output")
    return [p.get(key, p.get("pick")) for p in task["predictions"]]


def most_frequent_answer_share(task: Mapping[str, Any]) -> float:
    """How much of a task one answer takes (%): the share of the most frequent answer text, or for
    multiple choice of the most frequent picked position where that is higher (the choices of
    social_iqa differ per question, so a model stuck on "the first listed choice" shows there).
    100: the same answer, or the same position, for every question."""
    share = top_answer_share(given_answers(task))
    if task["metric"] == "acc":
        share = max(share, top_answer_share([p["pick"] for p in task["predictions"]]))
    return share
