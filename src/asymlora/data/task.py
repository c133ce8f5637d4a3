"""A task: named examples of one kind, a prompt template, and deterministic train / test splits.

Every source is converted to the same four columns (``record_features()``):

- ``input``: the example's question or text, without the task-level instruction;
- ``choices``: the candidate answers (multiple choice only, else empty);
- ``answer``: the index of the correct choice (multiple choice only, else -1);
- ``targets``: the reference answers as text (for multiple choice: the correct choice).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # datasets is imported where used: listing tasks does not need it
    from datasets import Dataset, DatasetDict, Features

from asymlora.errors import AsymloraError, InputError

Kind = Literal["multiple_choice", "numeric", "text"]
KINDS: tuple[Kind, ...] = ("multiple_choice", "numeric", "text")


def record_features() -> Features:
    """The four columns of every task's examples, as a ``datasets.Features``."""
    from datasets import Features, Value
    from datasets import Sequence as SequenceFeature

    return Features(
        {
            "input": Value("string"),
            "choices": SequenceFeature(Value("string")),
            "answer": Value("int64"),
            "targets": SequenceFeature(Value("string")),
        }
    )


class DataFormatError(InputError):
    """Input data that does not have the expected shape; the message names the file and line."""


class UnknownTaskError(AsymloraError, KeyError):
    """A task or suite name that is not registered; the message lists the available ones."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a number (thousands separators allowed)."""
    try:
        float(text.strip().replace(",", ""))
    except ValueError:
        return False
    return True


MAX_NAME = 100
_SAFE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")


def check_task_name(name: str, where: str) -> str:
    """``name`` if it is safe as a single path component (a task's name names its folders under a
    run: ``peft/<name>``, ``adapters/<name>``): 1-100 letters, digits, ``.``, ``_`` or ``-``,
    starting with a letter or digit, so never ``..``, a separator or a control character."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise InputError(
            f"{where}: task name {name!r} is not allowed; a task name is 1-{MAX_NAME} letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


def name_from(text: str) -> str:
    """A safe task name made from ``text`` (a file's stem, a dataset's name): every run of other
    characters becomes ``_``, leading punctuation goes, and it is cut to the length limit."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._-")[:MAX_NAME].rstrip("._-")
    return name or "task"


def mc_record(input: str, choices: Sequence[str], answer: int) -> dict[str, Any]:
    """A multiple-choice record; ``answer`` indexes ``choices``."""
    choices = [str(c) for c in choices]
    return {"input": input, "choices": choices, "answer": int(answer), "targets": [choices[answer]]}


def target_record(input: str, targets: str | Sequence[str]) -> dict[str, Any]:
    """A numeric or text record with one or more reference answers."""
    targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    return {"input": input, "choices": [], "answer": -1, "targets": targets}


@dataclass(frozen=True)
class PromptTemplate:
    """How an example becomes the model's input: ``prefix + input_prefix + input [+ choices] +
    output_prefix``. The answer is appended as ``" " + answer`` (trailing spaces of the prompt are
    dropped, so that BPE tokenizers see the usual `` word`` tokens). BIG-bench's defaults."""

    prefix: str = ""
    input_prefix: str = "Q: "
    output_prefix: str = "\nA:"
    choice_prefix: str = "\n  choice: "
    list_choices: bool = False

    def render(self, input: str, choices: Sequence[str] = ()) -> str:
        text = self.prefix + self.input_prefix + input
        if self.list_choices:
            text += "".join(self.choice_prefix + c for c in choices)
        return (text + self.output_prefix).strip(" ").lstrip("\n")


VERBATIM_TEMPLATE = PromptTemplate(input_prefix="", output_prefix="")
"""For sources whose ``input`` is already the full prompt (rendered per subtask, or written by a user)."""


def continuation(answer: str) -> str:
    """The text the model should produce after a rendered prompt."""
    return " " + answer.strip()


@dataclass(frozen=True)
class Example:
    """A training example: the rendered prompt, the text to learn after it, and the task it
    belongs to (an adapter routed by task trains expert ``task_id`` on it)."""

    prompt: str
    target: str
    task_id: int = 0


@dataclass(frozen=True)
class Task:
    """A named task. ``load`` returns canonical records (see ``mc_record``, ``target_record``)."""

    name: str
    kind: Kind
    load: Callable[[], list[dict[str, Any]]] = field(repr=False, compare=False)
    template: PromptTemplate = PromptTemplate()
    source: str = ""
    test_fraction: float = 0.2
    max_test: int = 1000
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    answer_position: Literal["first", "last"] = "first"  # numeric: which number in the output counts
    group: Callable[[str], str] | None = field(default=None, repr=False, compare=False)
    """Where several examples share one item (winowhy: one sentence, several reasonings), the item
    of an example's input: a train/test split then keeps each item's examples on one side."""
    load_test: Callable[[], list[dict[str, Any]]] | None = field(default=None, repr=False, compare=False)
    """The source's own test split, where it has one (``load`` then returns its train split):
    ``splits`` keeps the two as given instead of cutting ``test_fraction`` off the pooled examples."""
    score_answer: Callable[[str, Mapping[str, Any]], float] | None = field(
        default=None, repr=False, compare=False
    )
    """Where the source scores its own answers (reasoning-gym's ``score_answer``): a generated
    output and the example it answers -> a score in [0, 1]. Generative tasks without one are scored
    by exact number match (numeric) or ROUGE (text)."""

    def __post_init__(self) -> None:
        check_task_name(self.name, self.source or "task")

    def examples(self) -> Dataset:
        """All examples, deduplicated by input and choices (so that no prompt is in both splits).
        Loaded once per Task object."""
        return self._examples

    @functools.cached_property
    def _examples(self) -> Dataset:
        test = self.load_test() if self.load_test else []
        return build_dataset([*self.load(), *test], kind=self.kind, where=self.name)

    def splits(self, seed: int = 0) -> DatasetDict:
        """Deterministic, disjoint ``train`` / ``test`` splits; the test split is shuffled, so its
        first n examples are a random sample. A source's own splits (``load_test``) are kept, each
        shuffled with ``seed``; a train example that is also in its test split is dropped."""
        if self.load_test is not None:
            return given_splits(self.load(), self.load_test(), kind=self.kind, where=self.name, seed=seed)
        return split_dataset(
            self.examples(),
            seed=seed,
            test_fraction=self.test_fraction,
            max_test=self.max_test,
            group=self.group,
        )

    def prompt(self, example: Mapping[str, Any]) -> str:
        return self.template.render(example["input"], example["choices"])

    def target(self, example: Mapping[str, Any]) -> str:
        """The training target: the correct choice or the first reference answer."""
        return example["targets"][0]

    def train_examples(self, seed: int = 0, limit: int | None = None, task_id: int = 0) -> list[Example]:
        """The train split of ``splits(seed)`` as (prompt, continuation) examples, the first
        ``limit`` of them (None: all)."""
        split = self.splits(seed)["train"]
        if limit is not None:
            split = split.select(range(min(limit, len(split))))
        return self.to_examples(split, task_id)

    def to_examples(self, rows: Iterable[Mapping[str, Any]], task_id: int = 0) -> list[Example]:
        """Records (of this task) as (prompt, continuation) examples of expert ``task_id``."""
        return [Example(self.prompt(ex), continuation(self.target(ex)), task_id) for ex in rows]


def training_examples(tasks: Sequence[Task], seed: int = 0, limit: int | None = None) -> list[list[Example]]:
    """One list per task, its ``train_examples``, with task id = the task's position."""
    return [task.train_examples(seed, limit, task_id) for task_id, task in enumerate(tasks)]


def unique_records(
    records: Sequence[Mapping[str, Any]], *, kind: Kind, where: str
) -> list[Mapping[str, Any]]:
    """Validate canonical records and drop duplicates (same input and choices; first one kept)."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    rows: list[Mapping[str, Any]] = []
    for i, record in enumerate(records):
        check_record(record, kind=kind, where=f"{where}: example {i}")
        key = _key(record)
        if key not in seen:
            seen.add(key)
            rows.append(record)
    if not rows:
        raise DataFormatError(f"{where}: no examples")
    return rows


def build_dataset(records: Sequence[Mapping[str, Any]], *, kind: Kind, where: str) -> Dataset:
    """The unique records (``unique_records``) as a ``datasets.Dataset``."""
    rows = unique_records(records, kind=kind, where=where)
    from datasets import Dataset

    return Dataset.from_list([dict(r) for r in rows], features=record_features())


def _key(record: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    return record["input"], tuple(record["choices"])


def given_splits(
    train: Sequence[Mapping[str, Any]],
    test: Sequence[Mapping[str, Any]],
    *,
    kind: Kind,
    where: str,
    seed: int,
) -> DatasetDict:
    """A source's own ``train`` / ``test`` splits, each deduplicated and shuffled with ``seed``; a
    train example also in the test split is dropped from train, so that no prompt is on both sides."""
    check_seed(seed)
    test_rows = unique_records(test, kind=kind, where=f"{where} (test split)")
    held_out = {_key(r) for r in test_rows}
    train_rows = [r for r in unique_records(train, kind=kind, where=f"{where} (train split)")
                  if _key(r) not in held_out]  # fmt: skip
    if not train_rows:
        raise DataFormatError(f"{where}: every example of the train split is also in the test split")
    from datasets import Dataset, DatasetDict

    def dataset(rows: list[Mapping[str, Any]]) -> Dataset:
        return Dataset.from_list([dict(r) for r in rows], features=record_features()).shuffle(seed=seed)

    return DatasetDict(train=dataset(train_rows), test=dataset(test_rows))


def check_seed(seed: int) -> None:
    if seed < 0:  # numpy's generators, which shuffle, take none
        raise InputError(f"split seed {seed}: give a seed >= 0")


MAX_TEXT_CHARS = 100_000
"""The longest input, choice or target taken (characters): far above any model's context, and
checked before anything is tokenized (a 50 MB line would otherwise abort the tokenizer)."""


def check_text_length(text: str, what: str, where: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise DataFormatError(
            f"{where}: the {what} is {len(text):,} characters long; at most {MAX_TEXT_CHARS:,} are taken"
        )


def check_record(record: Mapping[str, Any], *, kind: Kind, where: str) -> None:
    if not isinstance(record.get("input"), str) or not record["input"].strip():
        raise DataFormatError(f"{where}: empty or missing input")
    check_text_length(record["input"], "input", where)
    for text in [*record["choices"], *record["targets"]]:
        check_text_length(text, "answer" if kind != "multiple_choice" else "choice", where)
    if kind == "multiple_choice":
        n = len(record["choices"])
        if n < 2 or not 0 <= record["answer"] < n:
            raise DataFormatError(f"{where}: needs at least 2 choices and an answer index in [0, {n})")
    elif not record["targets"]:
        raise DataFormatError(f"{where}: needs at least one target answer")


def split_dataset(
    data: Dataset,
    *,
    seed: int,
    test_fraction: float = 0.2,
    max_test: int = 1000,
    group: Callable[[str], str] | None = None,
) -> DatasetDict:
    """Shuffle with ``seed`` and cut: ``min(max_test, round(test_fraction * n))`` test examples
    (at least one), the rest train. With ``group`` (input -> item), whole items go to the test side,
    in a seeded order, until it holds at least that many examples; no item is on both sides."""
    check_seed(seed)
    n = len(data)
    if n < 2:
        raise DataFormatError(f"cannot split {n} example(s) into train and test; need at least 2")
    n_test = min(max_test, max(1, round(test_fraction * n)), n - 1)
    if group is None:
        return data.train_test_split(test_size=n_test, shuffle=True, seed=seed)
    members: dict[str, list[int]] = {}
    for i, text in enumerate(data["input"]):
        members.setdefault(group(text), []).append(i)
    import numpy as np
    from datasets import DatasetDict

    if len(members) < 2:
        raise DataFormatError(f"cannot split {n} examples of one item into train and test")
    items = list(members.values())
    order = np.random.default_rng(seed).permutation(len(items))
    test: list[int] = []
    for k in order[:-1]:  # the last item always stays in train
        if len(test) >= n_test:
            break
        test += items[k]
    chosen = set(test)
    test = [test[i] for i in np.random.default_rng(seed + 1).permutation(len(test))]  # shuffled
    train = [i for i in range(n) if i not in chosen]
    return DatasetDict(train=data.select(train), test=data.select(test))
