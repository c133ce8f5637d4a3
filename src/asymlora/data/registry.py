"""The named tasks and suites. Loading is lazy: nothing is read or fetched until a task's examples
are asked for.

Suites:
- ``commonsense``: 8 multiple-choice BIG-bench tasks (the paper's commonsense suite is 8 tasks too).
- ``math``: BIG-bench elementary_math_qa (multiple choice) and arithmetic (numeric), and
  reasoning-gym's GSM8K-style gsm_symbolic (numeric).
- ``nlp-multitask``: 8 natural-instructions tasks, one per instruction category (answer generation,
  question generation, classification, ...), scored with ROUGE-L, like the paper's FLAN suite.
- ``fed-nlp``: 8 natural-instructions tasks from 8 different source datasets, one per client, in the
  spirit of the FedDPA split (which is built from FLAN and is not available offline).
- ``reasoning``: 4 reasoning-gym tasks whose answers come from a small closed set, scored as
  multiple choice over that set. Generated offline by the installed reasoning-gym package, so they
  need no download (the demo's tasks).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from asymlora.data.bigbench import (
    bigbench_root,
    ensure_bigbench,
    ensure_bigbench_tree,
    kind_of_task,
    read_task_json,
    records_from_task,
)
from asymlora.data.formats import file_task
from asymlora.data.task import (
    VERBATIM_TEMPLATE,
    Kind,
    PromptTemplate,
    Task,
    UnknownTaskError,
    mc_record,
    target_record,
)
from asymlora.errors import UsageError
from asymlora.models import cache_dir

BIGBENCH_PREFIX = "bigbench:"
HF_PREFIX = "hf:"
RG_PREFIX = "rg:"

GSM_SIZE = 1000
GSM_DATA_SEED = 0  # which problems are generated; the train/test split has its own seed
RG_SIZE, RG_DATA_SEED = 1000, 0  # the same for the reasoning suite's tasks
REASONING = ("family_relationships", "color_cube_rotation", "syllogism", "aiw")


def _bigbench_loader(paths: Sequence[str], kind: Kind) -> Callable[[], list[dict[str, Any]]]:
    def load() -> list[dict[str, Any]]:
        return _bigbench_records(ensure_bigbench(ALL_BIGBENCH_PATHS, cache_dir()), paths, kind)

    return load


def _bigbench_records(root: Path, paths: Sequence[str], kind: Kind) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        data = read_task_json(root / path / "task.json")
        records += records_from_task(data, kind, where=f"BIG-bench {path}")
    return records


def bigbench_task(path: str) -> Task:
    """Any BIG-bench JSON task by its path (``bigbench:<task>`` or ``bigbench:<task>/<subtask>``):
    a task with subtasks pools them. The files are fetched on first use; the kind comes from them."""
    root = bigbench_root(cache_dir())
    paths = ensure_bigbench_tree(path, cache_dir())
    kind = kind_of_task([read_task_json(root / p / "task.json") for p in paths])
    return Task(
        path.replace("/", "."),
        kind,
        lambda: _bigbench_records(root, paths, kind),
        VERBATIM_TEMPLATE,
        "BIG-bench " + ", ".join(paths),
        max_new_tokens=48 if kind == "text" else 32,
    )


def winograd_sentence(text: str) -> str:
    """winowhy: the Winograd sentence an example reasons about (each comes with several reasonings,
    some right and some wrong), i.e. the input before " The '<pronoun>' refers to"."""
    return text.split(" The '")[0]


def _bigbench(name: str, kind: Kind, paths: Sequence[str] | None = None, **options: Any) -> Task:
    paths = tuple(paths or [name])
    _BIGBENCH_PATHS.extend(paths)
    _BIGBENCH_OF[name] = paths
    source = "BIG-bench " + ", ".join(paths)
    return Task(name, kind, _bigbench_loader(paths, kind), VERBATIM_TEMPLATE, source, **options)


def _generate(dataset: str, size: int, seed: int) -> list[dict[str, Any]]:
    """``size`` problems of a reasoning-gym dataset, a pure function of ``seed`` (and its version)."""
    from asymlora.data.rg import generated  # imported here: rg builds on this module

    return list(generated(dataset, size, seed)[1])


def _load_gsm_symbolic() -> list[dict[str, Any]]:
    data = _generate("gsm_symbolic", GSM_SIZE, GSM_DATA_SEED)
    return [target_record(item["question"], str(item["answer"])) for item in data]


def closed_set_records(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Multiple-choice records from problems whose answers come from a small closed set: every
    question's choices are the whole set (shortest first, then alphabetical), the same on every
    question, so the model must pick the answer and not spot it among a few candidates."""
    answers = [str(item["answer"]).strip() for item in items]
    choices = sorted(set(answers), key=lambda a: (len(a), a))
    return [
        mc_record(item["question"].strip(), choices, choices.index(a))
        for item, a in zip(items, answers, strict=True)
    ]


REASONING_TEMPLATE = PromptTemplate(input_prefix="Question: ", output_prefix="\nAnswer:")


def reasoning_task(
    dataset: str, *, size: int = RG_SIZE, seed: int = RG_DATA_SEED, kind: Kind = "multiple_choice"
) -> Task:
    """``size`` problems of a reasoning-gym dataset as a task: multiple choice over the closed set of
    its answers (the reasoning suite), or ``numeric`` / ``text`` with the answer as the target."""
    if kind == "multiple_choice":
        load = functools.partial(_closed_set, dataset, size, seed)
        what = "; the answer set as choices"
    else:
        load = functools.partial(_answers, dataset, size, seed)
        what = ""
    source = f"reasoning-gym {dataset} ({size} problems, seed {seed}{what})"
    return Task(dataset, kind, load, REASONING_TEMPLATE, source)


def _closed_set(dataset: str, size: int, seed: int) -> list[dict[str, Any]]:
    return closed_set_records(_generate(dataset, size, seed))


def _answers(dataset: str, size: int, seed: int) -> list[dict[str, Any]]:
    return [
        target_record(item["question"].strip(), str(item["answer"]).strip())
        for item in _generate(dataset, size, seed)
    ]


_BIGBENCH_PATHS: list[str] = []
_BIGBENCH_OF: dict[str, tuple[str, ...]] = {}  # task name -> its BIG-bench task paths

_NI = "natural_instructions/"
_NLP_MULTITASK = {  # instruction category -> natural-instructions subtask
    "answer_generation": "subtask024_cosmosqa_answer_generation",
    "question_generation": "subtask040_qasc_question_generation",
    "classification": "subtask046_miscellaenous_question_typing",
    "incorrect_answer_generation": "subtask055_multirc_write_incorrect_answer",
    "text_modification": "subtask034_winogrande_question_modification_object",
    "verification": "subtask018_mctaco_temporal_reasoning_presence",
    "span_answer": "subtask028_drop_answer_generation",
    "reasoning_answer": "subtask061_ropes_answer_generation",
}
_FED_NLP = [  # one source dataset per client
    "subtask002_quoref_answer_generation",
    "subtask010_mctaco_answer_generation_event_ordering",
    "subtask023_cosmosqa_question_generation",
    "subtask027_drop_answer_type_generation",
    "subtask033_winogrande_answer_generation",
    "subtask041_qasc_answer_generation",
    "subtask051_multirc_correct_answer_single_sentence",
    "subtask060_ropes_question_generation",
]


def _ni_name(subtask: str) -> str:
    return "ni_" + subtask.split("_", 1)[1]


def _ni(subtask: str) -> Task:
    return _bigbench(_ni_name(subtask), "text", [_NI + subtask], max_new_tokens=48, max_test=500)


def _build_tasks() -> dict[str, Task]:
    tasks = [
        _bigbench("social_iqa", "multiple_choice"),
        _bigbench("strategyqa", "multiple_choice"),
        _bigbench("winowhy", "multiple_choice", group=winograd_sentence),
        _bigbench(
            "goal_step_wikihow",
            "multiple_choice",
            ["goal_step_wikihow/goal_inference", "goal_step_wikihow/step_inference"],
        ),
        _bigbench("timedial", "multiple_choice"),
        _bigbench(
            "logical_deduction",
            "multiple_choice",
            [f"logical_deduction/{n}_objects" for n in ("three", "five", "seven")],
        ),
        _bigbench("date_understanding", "multiple_choice"),
        _bigbench("physical_intuition", "multiple_choice"),
        _bigbench("elementary_math_qa", "multiple_choice", ["elementary_math_qa/question_only"]),
        _bigbench(
            "arithmetic",
            "numeric",
            [
                f"arithmetic/{op}"
                for op in (
                    "3_digit_addition",
                    "3_digit_subtraction",
                    "2_digit_multiplication",
                    "2_digit_division",
                )
            ],  # fmt: skip
            max_new_tokens=8,
        ),
        Task(
            "gsm_symbolic",
            "numeric",
            _load_gsm_symbolic,
            PromptTemplate(input_prefix="Question: ", output_prefix="\nAnswer: Let's think step by step."),
            f"reasoning-gym gsm_symbolic ({GSM_SIZE} problems, seed {GSM_DATA_SEED})",
            max_new_tokens=160,
            stop=("\n\n", "Question:"),
            answer_position="last",
        ),
        *(_ni(sub) for sub in [*_NLP_MULTITASK.values(), *_FED_NLP]),
        *(reasoning_task(name) for name in REASONING),
    ]
    return {task.name: task for task in tasks}


TASKS: dict[str, Task] = _build_tasks()
ALL_BIGBENCH_PATHS: tuple[str, ...] = tuple(dict.fromkeys(_BIGBENCH_PATHS))

SUITES: dict[str, tuple[str, ...]] = {
    "commonsense": (
        "social_iqa",
        "strategyqa",
        "winowhy",
        "goal_step_wikihow",
        "timedial",
        "logical_deduction",
        "date_understanding",
        "physical_intuition",
    ),
    "math": ("elementary_math_qa", "arithmetic", "gsm_symbolic"),
    "nlp-multitask": tuple(_ni_name(s) for s in _NLP_MULTITASK.values()),
    "fed-nlp": tuple(_ni_name(s) for s in _FED_NLP),
    "reasoning": REASONING,
}


def list_tasks() -> list[str]:
    return sorted(TASKS)


def list_suites() -> list[str]:
    return list(SUITES)


def get_task(name: str) -> Task:
    """A registered task; any BIG-bench task as ``bigbench:<task>[/<subtask>]``; any reasoning-gym
    dataset as ``rg:<dataset>?<options>`` (see ``asymlora.data.rg``); a Hugging Face
    dataset as ``hf:<name, folder or data file>?<column mapping>`` (see ``asymlora.data.hf``); or a local
    ``.json`` / ``.jsonl`` file given by its path."""
    if name in TASKS:
        return TASKS[name]
    if name.startswith(BIGBENCH_PREFIX):
        return bigbench_task(name.removeprefix(BIGBENCH_PREFIX).strip("/"))
    if name.startswith(HF_PREFIX):
        from asymlora.data.hf import hf_task

        return hf_task(name)
    if name.startswith(RG_PREFIX):
        from asymlora.data.rg import rg_task

        return rg_task(name)
    if name.endswith((".json", ".jsonl")):
        if not _is_file(name):
            raise UnknownTaskError(
                f"task file {name}: no such file (or not one that can be read: a broken link?)"
            )
        return file_task(name)
    raise UnknownTaskError(
        f"unknown task {name!r}; available tasks: {', '.join(list_tasks())} "
        "(or bigbench:<task>, rg:<reasoning-gym dataset>, hf:<dataset>?prompt=...&answer=..., "
        "or the path of a .json / .jsonl file)"
    )


def get_tasks(names: Sequence[str]) -> list[Task]:
    """The tasks ``names`` give (see ``get_task``), each under a name of its own: two files
    ``a/t.jsonl`` and ``b/t.jsonl`` become tasks ``t-0`` and ``t-1``, since a task's name is its
    key in results, routing and exports. An empty list, and a task given twice, are refused."""
    if not names:
        raise UsageError("no task given: name at least one task or .json/.jsonl file")
    seen = [name if name in TASKS else _file_key(name) for name in names]
    twice = [name for name, key in zip(names, seen, strict=True) if seen.count(key) > 1]
    if twice:
        raise UsageError(f"task {twice[0]} is given twice; give each task once")
    tasks = [get_task(name) for name in names]
    unique = unique_names([t.name for t in tasks])
    return [t if t.name == u else replace(t, name=u) for t, u in zip(tasks, unique, strict=True)]


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except OSError:  # a symlink loop, a name too long for the file system
        return False


def _file_key(name: str) -> str:
    """What makes two names of one file the same (the resolved path), or the name itself where
    it cannot be resolved (a symlink loop: refused as a task later, in one line)."""
    try:
        return str(Path(name).resolve())
    except (OSError, RuntimeError):
        return name


def unique_names(names: list[str]) -> list[str]:
    """Names made unique by a suffix where two share one: the name's position in the list (two
    files ``a/t.jsonl``, ``b/t.jsonl``: ``t-0``, ``t-1``), or where that is taken by another name
    or an earlier suffix, the next free number (with a third file ``c/t-1.jsonl``: ``t-0``,
    ``t-2``, ``t-1``)."""
    taken = set(names)
    out = []
    for i, name in enumerate(names):
        if names.count(name) == 1:
            out.append(name)
            continue
        k = i
        while f"{name}-{k}" in taken:
            k += 1
        taken.add(f"{name}-{k}")
        out.append(f"{name}-{k}")
    return out


def is_downloaded(task: Task) -> bool:
    """Whether a task's data is on this machine already (only BIG-bench tasks are downloaded)."""
    root = bigbench_root(cache_dir())
    return all((root / p / "task.json").is_file() for p in _BIGBENCH_OF.get(task.name, ()))


def is_generated(task: Task) -> bool:
    """Whether a registered task's data is generated on first use (reasoning-gym), not read."""
    return task.name in TASKS and task.name not in _BIGBENCH_OF


def split_counts(task: Task, seed: int = 0, compute: bool = True) -> dict[str, int] | None:
    """``{"train": n, "test": n}`` of a task's split for ``seed``, remembered in the cache folder
    (keyed by name, source and seed) so that listing the tasks builds no split twice; None when not
    remembered yet and not ``compute``."""
    path = cache_dir() / "task_sizes.json"
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sizes = {}
    key = f"{task.name} | {task.source} | seed {seed}"
    known = sizes.get(key)
    if isinstance(known, dict) and {"train", "test"} <= set(known):
        return known
    if not compute:
        return None
    splits = task.splits(seed)
    sizes[key] = {"train": len(splits["train"]), "test": len(splits["test"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sizes, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return sizes[key]


def get_suite(name: str) -> list[Task]:
    if name not in SUITES:
        raise UnknownTaskError(f"unknown suite {name!r}; available suites: {', '.join(list_suites())}")
    return [TASKS[t] for t in SUITES[name]]
