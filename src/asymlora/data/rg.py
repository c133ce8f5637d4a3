"""Any reasoning-gym dataset as a task: ``rg:<dataset>?<options>``.

reasoning-gym generates its problems offline, as a pure function of the dataset's settings and a
seed. The options are:

- ``size=N`` (default 1000) and ``seed=N`` (default 0): how many problems, and which;
- ``kind=multiple_choice|numeric|text``: how the task is scored (default: from the answers, below);
- ``name=NAME``: the task's name (default: the dataset's);
- ``max_new_tokens=N``: the generation budget (default: from the longest answer);
- anything else is one of the dataset's own settings, passed to ``reasoning_gym.create_dataset``
  (``rg:basic_arithmetic?min_terms=2&max_terms=3``); a value is read as JSON where it parses
  (``3``, ``0.5``, ``true``, ``[1,2]``), else as text.

A dataset whose answers come from a small closed set (at most ``MAX_CHOICES`` distinct answers over
its problems) is scored as multiple choice over that set, as the reasoning suite is. Any other is
generative: decoded greedily, and each output scored by the dataset's own ``score_answer`` (1 for a
right answer, some datasets give partial credit), not by a metric of ours.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from asymlora.config import first_repeated
from asymlora.data.registry import REASONING_TEMPLATE, closed_set_records
from asymlora.data.task import (
    KINDS,
    DataFormatError,
    Kind,
    Task,
    UnknownTaskError,
    check_task_name,
    is_number,
    target_record,
)

PREFIX = "rg:"
OWN_OPTIONS = ("size", "seed", "kind", "name", "max_new_tokens")
MAX_CHOICES = 16
"""At most this many distinct answers: the dataset is scored as multiple choice over them."""
MAX_SIZE = 100_000
MAX_NEW_TOKENS = 512


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym.factory
    except ImportError:
        raise ImportError("reasoning-gym tasks need reasoning-gym: pip install reasoning-gym") from None
    return reasoning_gym.factory


def dataset_names() -> list[str]:
    """Every dataset the installed reasoning-gym can generate."""
    return sorted(_reasoning_gym().DATASETS)


def dataset_settings(dataset: str) -> dict[str, Any]:
    """A dataset's own settings with their defaults (the fields of its config class)."""
    import dataclasses

    config_cls = _reasoning_gym().DATASETS[dataset][1]
    defaults = config_cls()
    return {f.name: getattr(defaults, f.name) for f in dataclasses.fields(config_cls)
            if f.name not in OWN_OPTIONS}  # fmt: skip


def _nearest(word: str, names: list[str]) -> str:
    close = difflib.get_close_matches(word, names, n=5, cutoff=0.5)
    return ", ".join(close) if close else ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _count(spec: str, key: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise DataFormatError(f"{spec!r}: {key}={text!r}; give a whole number in [{low}, {high}]")
    return value


def parse_spec(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``rg:<dataset>?a=b&...`` -> (dataset, our options, the dataset's settings), each checked:
    an unknown dataset or setting is refused with the nearest names."""
    dataset, _, query = spec.removeprefix(PREFIX).partition("?")
    names = dataset_names()
    if dataset not in names:
        raise UnknownTaskError(
            f"{spec!r}: reasoning-gym has no dataset {dataset!r}; nearest: {_nearest(dataset, names)} "
            "(asymlora tasks --rg lists them all)"
        )
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise DataFormatError(f"{spec!r}: options go as ?key=value&key=value") from None
    twice = first_repeated(k for k, _ in pairs)
    if twice is not None:
        raise DataFormatError(f"{spec!r}: option {twice} is given twice; give it once")
    ours = {k: v for k, v in pairs if k in OWN_OPTIONS}
    settings = {k: _value(v) for k, v in pairs if k not in OWN_OPTIONS}
    known = list(dataset_settings(dataset))
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise DataFormatError(
            f"{spec!r}: {dataset} has no setting {unknown[0]!r}; nearest: "
            f"{_nearest(unknown[0], [*OWN_OPTIONS, *known])} (its settings: {', '.join(known)}; "
            f"ours: {', '.join(OWN_OPTIONS)})"
        )
    options: dict[str, Any] = {
        "size": _count(spec, "size", ours.get("size", "1000"), 2, MAX_SIZE),
        "seed": _count(spec, "seed", ours.get("seed", "0"), 0, 2**32 - 1),
        "name": ours.get("name", dataset),
        "kind": ours.get("kind"),
        "max_new_tokens": None,
    }
    if "max_new_tokens" in ours:
        options["max_new_tokens"] = _count(spec, "max_new_tokens", ours["max_new_tokens"], 1, MAX_NEW_TOKENS)
    if options["kind"] is not None and options["kind"] not in KINDS:
        raise DataFormatError(f"{spec!r}: kind must be one of {', '.join(KINDS)}")
    check_task_name(options["name"], repr(spec))
    return dataset, options, settings


@functools.lru_cache(maxsize=32)
def generated(dataset: str, size: int, seed: int, settings_json: str = "{}") -> tuple[Any, tuple[dict, ...]]:
    """The dataset object and its ``size`` problems, a pure function of the settings and ``seed``
    (cached: a task is often built several times)."""
    factory = _reasoning_gym()
    settings = json.loads(settings_json)
    try:
        data = factory.create_dataset(dataset, size=size, seed=seed, **settings)
    except (TypeError, ValueError, AssertionError) as err:
        detail = str(err) or type(err).__name__
        raise DataFormatError(
            f"rg:{dataset}: reasoning-gym refused the settings {settings}: {detail}"
        ) from None
    return data, tuple(data)


def rg_task(spec: str) -> Task:
    """The task an ``rg:`` spec names. Its problems are generated here, since how it is scored
    (multiple choice or generated and scored by the dataset) depends on its answers."""
    dataset, options, settings = parse_spec(spec)
    data, items = generated(dataset, options["size"], options["seed"], json.dumps(settings, sort_keys=True))
    answers = [str(item["answer"]).strip() for item in items]
    kind: Kind = options["kind"] or _kind_of(answers)
    described = ", ".join(f"{k}={v}" for k, v in settings.items())
    source = f"reasoning-gym {dataset} ({options['size']} problems, seed {options['seed']}" + (
        f", {described}" if described else "") + ")"  # fmt: skip
    if kind == "multiple_choice":
        records = closed_set_records(items)
        return Task(
            options["name"], kind, lambda: records, REASONING_TEMPLATE, source + "; the answer set as choices"
        )
    records = [target_record(item["question"].strip(), a) for item, a in zip(items, answers, strict=True)]
    multiline = any("\n" in a for a in answers)
    return Task(
        options["name"],
        kind,
        lambda: records,
        REASONING_TEMPLATE,
        source + "; scored by its score_answer",
        max_new_tokens=options["max_new_tokens"] or _budget(answers),
        stop=("\n\n", "\nQuestion:") if multiline else ("\n",),
        score_answer=DatasetScorer(dataset, data, items),
    )


def _kind_of(answers: list[str]) -> Kind:
    if len(set(answers)) <= MAX_CHOICES:
        return "multiple_choice"
    return "numeric" if all(is_number(a) for a in answers) else "text"


def _budget(answers: list[str]) -> int:
    """Tokens to generate: enough for the longest answer spelt one character per token, plus a
    margin, at most ``MAX_NEW_TOKENS`` (the output stops at the task's stop string anyway)."""
    return min(MAX_NEW_TOKENS, max(16, max(len(a) for a in answers) + 8))


class DatasetScorer:
    """A generated output scored by its reasoning-gym dataset's own ``score_answer`` against the
    problem it answers (found by its question text), in [0, 1]."""

    def __init__(self, dataset: str, data: Any, items: tuple[dict, ...]) -> None:
        self.dataset = dataset
        self._data = data
        self._entries = {}
        for item in items:  # the first of equal questions, as the task's deduplication keeps
            self._entries.setdefault(item["question"].strip(), item)

    def __call__(self, output: str, example: Mapping[str, Any]) -> float:
        entry = self._entries.get(example["input"])
        if entry is None:
            raise DataFormatError(
                f"rg:{self.dataset}: a question to score is not one of the dataset's problems "
                "(the task's data changed since it was scored)"
            )
        try:
            score = self._data.score_answer(answer=output.strip(), entry=entry)
        except Exception:  # noqa: BLE001 - a dataset's scorer that fails on a model's text scores it 0
            return 0.0
        score = float(score) if isinstance(score, (int, float)) else math.nan
        if not 0.0 <= score <= 1.0:  # NaN too
            raise DataFormatError(f"rg:{self.dataset}: score_answer returned {score}, not a score in [0, 1]")
        return score
