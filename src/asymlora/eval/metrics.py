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


def mc_picks(
    logprobs: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]]
) -> tuple[list[int], list[int]]:
    """Raw picks (highest total log-likelihood) and length-normalised picks (highest log-likelihood
    per byte of the choice's text, as lm-evaluation-harness' ``acc_norm``)."""
    raw = [pick(lp) for lp in logprobs]
    norm = [
        pick([x / max(n, 1) for x, n in zip(lp, ns, strict=True)])
        for lp, ns in zip(logprobs, lengths, strict=True)
    ]
    return raw, norm


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
