"""Tasks from local files, in the formats the paper's reference code and users bring.

- User JSONL: ``{"prompt", "choices", "answer"}`` (multiple choice; ``answer`` is an index or the
  correct choice's text) or ``{"prompt", "target"}`` (numeric when every target is a number, else text;
  ``target`` may be a list of references).
- LLM-Adapters JSON (``commonsense_170k.json``, ``math_10k.json``, their per-dataset test files):
  a list of ``{"instruction", "input", "output", "answer"}``. Commonsense items end with a line such
  as ``Answer format: option1/option2``: those labels become the choices and ``answer`` the correct
  one. Math items have a numeric ``answer``.
- Instruction JSON / JSONL as used for FedDPA / FLAN clients and Dolly: ``{"instruction",
  "input" | "context", "output" | "response"}``, scored with ROUGE. A folder of such files is a
  federation: one file per client (``client_tasks``).
Both ``.json`` (a list) and ``.jsonl`` (one object per line) files are read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.data.task import (
    KINDS,
    VERBATIM_TEMPLATE,
    DataFormatError,
    Kind,
    PromptTemplate,
    Task,
    check_task_name,
    is_number,
    mc_record,
    name_from,
    target_record,
)
from asymlora.errors import InputError

ALPACA_TEMPLATE = PromptTemplate(
    prefix="Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n",
    input_prefix="### Instruction:\n",
    output_prefix="\n\n### Response:",
)
_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+(?:\s*/\s*\S+)+)\s*$", re.IGNORECASE)


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(location, object)`` pairs; the location is ``file:line`` (JSONL) or ``file: item i`` (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text (byte {err.start})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        items = _parse_json(text, f"{path}")
        located = [(f"{path}: item {i}", item) for i, item in enumerate(items)]
    else:
        located = [
            (f"{path}:{lineno}", _parse_json(line, f"{path}:{lineno}"))
            for lineno, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    for where, item in located:
        if not isinstance(item, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if not located:
        raise DataFormatError(f"{path}: no examples")
    return located


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = f":{err.lineno}" if "\n" in text else ""
        raise DataFormatError(f"{where}{line}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise DataFormatError(f"{where}: JSON nested too deeply") from None


def detect_format(record: dict[str, Any]) -> str:
    """``user``, ``llm_adapters`` or ``instruction`` from the keys of one record."""
    if "prompt" in record:
        return "user"
    if "instruction" in record and "answer" in record:
        return "llm_adapters"
    if "instruction" in record:
        return "instruction"
    raise DataFormatError(
        f"unrecognised record keys {sorted(record)}; expected prompt+choices+answer, prompt+target, "
        "instruction+input+output+answer (LLM-Adapters) or instruction+output (FLAN/FedDPA)"
    )


def file_task(path: str | Path, *, kind: Kind | None = None, name: str | None = None) -> Task:
    """A task backed by a local file in any of the formats above (detected from the first record)."""
    path = Path(path)
    located = read_records(path)
    where, first = located[0]
    try:
        fmt = detect_format(first)
    except DataFormatError as err:
        raise DataFormatError(f"{where}: {err}") from None
    if kind is not None and kind not in KINDS:
        raise InputError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    parse = {"user": parse_user, "llm_adapters": parse_llm_adapters, "instruction": parse_instruction}[fmt]
    kind, records = parse(located, kind)
    template = VERBATIM_TEMPLATE if fmt == "user" else ALPACA_TEMPLATE
    return Task(
        name=check_task_name(name, f"{fmt} file {path}") if name else name_from(path.stem),
        kind=kind,
        load=lambda: records,
        template=template,
        source=f"{fmt} file {path}",
        max_new_tokens=64 if kind == "text" else 32,
    )


def client_tasks(folder: str | Path) -> list[Task]:
    """One task per ``.json`` / ``.jsonl`` file in ``folder`` (sorted by name): a FedDPA-style
    federation where client i holds the i-th file."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".json", ".jsonl"))
    if not files:
        raise DataFormatError(f"{folder}: no .json or .jsonl client files")
    return [file_task(p) for p in files]


def _require(item: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    value = item.get(key)
    if not isinstance(value, types) or (isinstance(value, (str, list)) and not value):
        raise DataFormatError(f"{where}: missing or empty {key!r}")
    return value


def _answer_text(value: Any, key: str, where: str) -> str:
    """A choice or target as text: a string with something in it, or a finite number (``3``,
    ``2.5``); anything else (a list, an object, null, true, NaN, "  ") is refused, naming it."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise DataFormatError(
        f"{where}: every {key} must be a non-empty string or a finite number, not {json.dumps(value)[:40]}"
    )


def parse_user(located: Sequence[tuple[str, dict]], kind: Kind | None) -> tuple[Kind, list[dict]]:
    multiple_choice = "choices" in located[0][1]
    records = []
    for where, item in located:
        prompt = _require(item, "prompt", str, where)
        if multiple_choice:
            choices = [_answer_text(c, "choice", where) for c in _require(item, "choices", list, where)]
            answer = item.get("answer")
            if isinstance(answer, str) and answer in choices:
                answer = choices.index(answer)
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise DataFormatError(
                    f"{where}: 'answer' must be an index into the {len(choices)} choices or one of them"
                )
            records.append(mc_record(prompt, choices, answer))
        else:
            target = _require(item, "target", (str, int, float, list), where)
            targets = [
                _answer_text(t, "target", where) for t in (target if isinstance(target, list) else [target])
            ]
            records.append(target_record(prompt, targets))
    if multiple_choice:
        return "multiple_choice", records
    numeric = all(is_number(r["targets"][0]) for r in records)
    return kind or ("numeric" if numeric else "text"), records


def _instruction_text(item: dict[str, Any], where: str) -> str:
    text = _require(item, "instruction", str, where).strip()
    extra = item.get("input") or item.get("context") or ""
    return f"{text}\n\n### Input:\n{extra.strip()}" if extra.strip() else text


def parse_llm_adapters(located: Sequence[tuple[str, dict]], kind: Kind | None) -> tuple[Kind, list[dict]]:
    labelled = all(_ANSWER_FORMAT.search(str(item.get("instruction") or "")) for _, item in located)
    if kind is None:
        numeric = all(is_number(str(item.get("answer", ""))) for _, item in located)
        kind = "multiple_choice" if labelled else "numeric" if numeric else "text"
    records = []
    for where, item in located:
        text = _instruction_text(item, where)
        answer = str(_require(item, "answer", (str, int, float), where)).strip()
        if kind == "multiple_choice":
            found = _ANSWER_FORMAT.search(item["instruction"])
            if not found:
                raise DataFormatError(f"{where}: no 'Answer format: a/b/...' line to take the choices from")
            labels = [label.strip() for label in found.group(1).split("/")]
            if answer not in labels:
                raise DataFormatError(f"{where}: answer {answer!r} is not one of {labels}")
            records.append(mc_record(text, labels, labels.index(answer)))
        else:
            records.append(target_record(text, answer))
    return kind, records


def parse_instruction(located: Sequence[tuple[str, dict]], kind: Kind | None) -> tuple[Kind, list[dict]]:
    records = []
    for where, item in located:
        output = item.get("output", item.get("response"))
        if not isinstance(output, str) or not output.strip():
            raise DataFormatError(f"{where}: missing or empty 'output' (or 'response')")
        records.append(target_record(_instruction_text(item, where), output.strip()))
    return kind or "text", records
