"""Hugging Face datasets as tasks: ``hf:<name, local folder or data file>?<options>``.

The data comes from ``datasets.load_dataset`` (a hub name, a local folder of data files, a loading
script, or one ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` file), or from
``datasets.load_from_disk`` for a folder written by ``save_to_disk``. A dataset with its own
``train`` split and a ``test`` split (or, without one, a ``validation`` split) keeps them: the task
trains on the first and is scored on the second (a train row whose prompt is also in the test split
is dropped; other splits are not used). Any other dataset is pooled and the task cuts its own 80/20
train/test split. The options map the dataset's columns onto a task, with the same meaning as the
fields of a user JSONL file:

- ``prompt=COLUMN`` (default ``prompt``): the text the model sees;
- ``choices=COLUMN`` and ``answer=COLUMN`` (default ``answer``): a multiple-choice task; the answer
  is an index or the correct choice's text. A ``ClassLabel`` answer column needs no choices column:
  its class names are the choices;
- ``target=COLUMN``: a numeric task when every target is a number, else a text task;
- ``split=NAME``: only this split, and the task cuts its own train/test split from it (default: the
  dataset's own train and test splits where it has them, else every split pooled);
- ``config=NAME``: the dataset's configuration; ``name=TASK``: the task's name; ``kind=KIND``.

Examples: ``hf:./my_qa?prompt=question&choices=options&answer=label``, ``hf:sums.csv?prompt=q&target=a`` (in a config file, a string of
``data.tasks`` or ``clients.tasks``; on the command line, a ``--task``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from asymlora.data.formats import parse_user
from asymlora.data.task import KINDS, VERBATIM_TEMPLATE, DataFormatError, Task, check_task_name, name_from

PREFIX = "hf:"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
OPTIONS = ("prompt", "choices", "answer", "target", "split", "config", "name", "kind")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``hf:<source>?a=b&c=d`` -> (source, {a: b, c: d}), refusing unknown options."""
    source, _, query = spec.removeprefix(PREFIX).partition("?")
    if not source:
        raise DataFormatError(f"{spec!r}: give a dataset name or folder after hf:")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DataFormatError(
            f"{spec!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
        )
    if options.get("kind") not in (None, *KINDS):
        raise DataFormatError(f"{spec!r}: kind must be one of {', '.join(KINDS)}")
    return source, options


def hf_task(spec: str) -> Task:
    """The task an ``hf:`` spec names; its rows are read (and checked) when the task is built."""
    source, options = parse_spec(spec)
    kind, train, test = _records(source, options, spec)
    path = Path(source)
    stem = path.stem if path.suffix.lower() in FILE_BUILDERS else path.name
    where = f"hf:{source}"
    name = check_task_name(options["name"], where) if "name" in options else name_from(stem or source)
    return Task(
        name=name,
        kind=kind,
        load=lambda: train,
        load_test=None if test is None else lambda: test,
        template=VERBATIM_TEMPLATE,
        source=f"Hugging Face dataset {source}",
        max_new_tokens=64 if kind == "text" else 32,
    )


def _load(source: str, options: dict[str, str]) -> Any:
    import datasets

    folder = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) and not folder.exists():
        raise DataFormatError(f"hf:{source}: no such file or folder")
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            data = datasets.load_from_disk(str(folder))
            split = options.get("split")
            return data[split] if split and isinstance(data, datasets.DatasetDict) else data
        if folder.is_file():
            return datasets.load_dataset(_builder(folder), data_files=str(folder), split=options.get("split"))
        return datasets.load_dataset(
            str(folder) if folder.exists() else source, options.get("config"), split=options.get("split")
        )
    except (
        FileNotFoundError,
        ValueError,
        KeyError,
        ConnectionError,
        datasets.exceptions.DatasetGenerationError,
    ) as err:
        raise DataFormatError(f"hf:{source}: cannot load this dataset ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    """The last line of the innermost cause (datasets wraps a file's error in its own, over lines)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _builder(path: Path) -> str:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataFormatError(
            f"hf:{path}: cannot read a {path.suffix or 'suffix-less'} file; "
            f"give a {', '.join(FILE_BUILDERS)} file or a dataset folder"
        )
    return builder


def _parts(data: Any) -> dict[str, Any]:
    """The dataset's own ``train`` and ``test`` (else ``validation``) splits where it has both,
    else everything pooled under ``""``."""
    import datasets

    if not isinstance(data, datasets.DatasetDict):
        return {"": data}
    test = next((s for s in ("test", "validation") if s in data), None)
    if "train" in data and test:
        return {"train": data["train"], test: data[test]}
    return {"": datasets.concatenate_datasets([data[s] for s in data])}


def _records(source: str, options: dict[str, str], spec: str) -> tuple[str, list[dict], list[dict] | None]:
    """The task's kind, then its records: the train split's and the test split's where the dataset
    has its own (see ``_parts``), else all of them and None."""
    parts = _parts(_load(source, options))
    wanted, item = _mapping(next(iter(parts.values())), options)
    located = []
    for split, part in parts.items():
        where = f" in split {split}" if split else ""
        missing = sorted({c for c in wanted if c not in part.column_names})
        if missing:
            raise DataFormatError(
                f"{spec!r}: no column {', '.join(missing)}{where}; the columns are "
                f"{', '.join(part.column_names)} (map them with prompt=, choices=, answer= or target=)"
            )
        if not len(part):
            raise DataFormatError(f"{spec!r}: no rows{where}")
        located += [
            (f"{spec} {split + ' ' if split else ''}row {i}", item(row)) for i, row in enumerate(part)
        ]
    kind, records = parse_user(located, options.get("kind"))  # type: ignore[arg-type]
    if len(parts) == 1:
        return kind, records, None
    n_train = len(parts["train"])
    return kind, records[:n_train], records[n_train:]


def _mapping(data: Any, options: dict[str, str]) -> tuple[list[str], Callable[[dict], dict]]:
    """The columns the options name (with their defaults), and a row -> user-record function."""
    import datasets

    prompt = options.get("prompt", "prompt")
    answer = options.get("answer", "answer")
    target = options.get("target")
    choices = options.get("choices")
    label = data.features.get(answer)
    class_names = label.names if isinstance(label, datasets.ClassLabel) else None
    if choices is None and target is None and class_names is None and "choices" in data.column_names:
        choices = "choices"
    if target is None and choices is None and class_names is None:
        target = "target"
    if target:
        return [prompt, target], lambda row: {"prompt": row[prompt], "target": row[target]}
    wanted = [prompt, answer, *([choices] if choices else [])]
    return wanted, lambda row: {
        "prompt": row[prompt],
        "choices": row[choices] if choices else class_names,
        "answer": row[answer],
    }
