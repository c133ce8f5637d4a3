"""Hugging Face datasets as tasks: ``hf:<name or local path>?<options>``.

The data comes from ``datasets.load_dataset`` (a hub name, a local folder of data files, a loading
script), or from ``datasets.load_from_disk`` for a folder written by ``save_to_disk``. The options
map the dataset's columns onto a task, with the same meaning as the fields of a user JSONL file:

- ``prompt=COLUMN`` (default ``prompt``): the text the model sees;
- ``choices=COLUMN`` and ``answer=COLUMN`` (default ``answer``): a multiple-choice task; the answer
  is an index or the correct choice's text. A ``ClassLabel`` answer column needs no choices column:
  its class names are the choices;
- ``target=COLUMN``: a numeric task when every target is a number, else a text task;
- ``split=NAME``: only this split (default: every split, pooled; the task makes its own train/test);
- ``config=NAME``: the dataset's configuration; ``name=TASK``: the task's name; ``kind=KIND``.

Example: ``hf:./my_qa?prompt=question&choices=options&answer=label`` (in a config file, a string of
``data.tasks`` or ``clients.tasks``; on the command line, a ``--task``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from asymlora.data.formats import parse_user
from asymlora.data.task import KINDS, VERBATIM_TEMPLATE, DataFormatError, Task

PREFIX = "hf:"
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
    kind, records = _records(source, options, spec)
    name = options.get("name") or re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).name or source).strip("_")
    return Task(
        name=name or "hf_dataset",
        kind=kind,
        load=lambda: records,
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
        return datasets.load_dataset(
            str(folder) if folder.exists() else source, options.get("config"), split=options.get("split")
        )
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as err:
        raise DataFormatError(f"hf:{source}: cannot load this dataset ({err})") from None


def _records(source: str, options: dict[str, str], spec: str) -> tuple[str, list[dict]]:
    import datasets

    data = _load(source, options)
    if isinstance(data, datasets.DatasetDict):
        data = datasets.concatenate_datasets([data[s] for s in data])
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
    wanted = [prompt, target] if target else [prompt, answer, *([choices] if choices else [])]
    missing = sorted({c for c in wanted if c not in data.column_names})
    if missing:
        raise DataFormatError(
            f"{spec!r}: no column {', '.join(missing)}; the columns are {', '.join(data.column_names)} "
            "(map them with prompt=, choices=, answer= or target=)"
        )
    located = []
    for i, row in enumerate(data):
        item = {"prompt": row[prompt]}
        if target:
            item["target"] = row[target]
        else:
            item["choices"] = row[choices] if choices else class_names
            item["answer"] = row[answer]
        located.append((f"{spec} row {i}", item))
    if not located:
        raise DataFormatError(f"{spec!r}: no rows")
    return parse_user(located, options.get("kind"))  # type: ignore[arg-type]
