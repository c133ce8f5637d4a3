"""Metrics on plain Python values: multiple-choice picks, numeric answer extraction, ROUGE."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Literal

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MARKERS = (re.compile(r"####\s*"), re.compile(r"answer is:?\s*", re.IGNORECASE))


def pick(scores: Sequence[float]) -> int:
    """The index of the highest score (the first one on ties)."""
    return max(range(len(scores)), key=scores.__getitem__)


MC_METRICS = ("acc", "acc_norm", "acc_bytes")
"""The multiple-choice metrics, as lm-evaluation-harness defines them: the choice of highest total
log-likelihood; of highest log-likelihood per character of the choice's text; per UTF-8 byte."""


def mc_picks(logprobs: Sequence[Sequence[float]], choices: Sequence[Sequence[str]]) -> dict[str, list[int]]:
    """The picked choice of each question under each of ``MC_METRICS``, computed as lm-eval's
    ``process_results`` computes them: the lengths are those of the choice's text without the space
    that joins it to the prompt (``continuation``), the first choice wins a tie. An empty choice
    counts as one character (lm-eval cannot score one)."""
    lengths = {
        "acc_norm": lambda text: len(text.strip()),
        "acc_bytes": lambda text: len(text.strip().encode("utf-8")),
    }
    picks = {"acc": [pick(lp) for lp in logprobs]}
    for name, size in lengths.items():
        picks[name] = [
            pick([x / max(size(c), 1) for x, c in zip(lp, cs, strict=True)])
            for lp, cs in zip(logprobs, choices, strict=True)
        ]
    return picks


def mc_metrics(
    logprobs: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], answers: Sequence[int]
) -> dict[str, float]:
    """Each of ``MC_METRICS`` in [0, 100]."""
    return {name: 100 * accuracy(p, answers) for name, p in mc_picks(logprobs, choices).items()}


def accuracy(picks: Sequence[int], answers: Sequence[int]) -> float:
    if not answers:
        return math.nan
    return sum(p == a for p, a in zip(picks, answers, strict=True)) / len(answers)


def extract_number(text: str, position: Literal["first", "last"] = "first") -> str | None:
    """The answer number in a model output: after ``####`` or ``answer is`` when present, else the
    first (or last) number in the text. Thousands separators are dropped: ``"1,200."`` -> ``"1200"``."""
    for marker in _MARKERS:
        found = list(marker.finditer(text))
        if found:
            after = _NUMBER.search(text, found[-1].end())
            if after:
                return after.group().replace(",", "").lstrip("+")
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return (numbers[0] if position == "first" else numbers[-1]).replace(",", "").lstrip("+")


def numbers_equal(predicted: str | None, target: str) -> bool:
    """Exact numeric match: ``"42"``, ``"42.0"`` and ``"42.00"`` are equal; ``None`` never is."""
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(target.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return predicted.strip() == target.strip()


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F1 in [0, 100], the best over the references (Google's rouge-score,
    Porter stemming on)."""
    scores = _rouge_scorer().score_multi(list(references), prediction)
    return {"rouge1": 100 * scores["rouge1"].fmeasure, "rougeL": 100 * scores["rougeL"].fmeasure}
