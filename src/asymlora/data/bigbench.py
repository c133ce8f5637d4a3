"""BIG-bench task JSON, taken from the ``bigbench==1.0.0`` source distribution on PyPI.

The package cannot be installed (its metadata declares a direct-URL dependency, which pip refuses),
but its sdist holds every JSON task. We let pip download and unpack it into a private temporary
folder (pip stops with an error after unpacking; that is expected), copy the ``task.json`` files we
use into the cache, and delete the rest. A local copy can be used instead: set
``ASYMLORA_BIGBENCH_SOURCE`` to the ``bigbench-1.0.0.tar.gz`` file, to an archive of the BIG-bench
repository (``.tar.gz`` or ``.zip``, as GitHub serves it) or to an unpacked source tree. (On
2026-12-05 PyPI listed only ``bigbench`` 0.0.1, which holds no tasks; the local copy is then the way.)
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from asymlora.data.task import DataFormatError, Kind, PromptTemplate, is_number, mc_record, target_record
from asymlora.errors import AsymloraError

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
SOURCE_ENV = "ASYMLORA_BIGBENCH_SOURCE"
TASKS_PATH = "bigbench/benchmark_tasks"
TREE_MARKER = ".asymlora-complete"  # in a task's cache folder: every subtask of it is extracted
HOW_TO_GET = (
    f"get the task files another way (the bigbench-1.0.0.tar.gz sdist, or an archive or clone of "
    f"https://github.com/google/BIG-bench) and set {SOURCE_ENV} to that file or folder"
)
_failed_downloads: dict[str, str] = {}  # requirement -> why pip failed: tried once per process


class BigBenchUnavailableError(AsymloraError, RuntimeError):
    """The BIG-bench task files could not be obtained; the message says how to get them."""


def bigbench_root(cache: Path) -> Path:
    return cache / "bigbench" / "1.0.0"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def ensure_bigbench(paths: Iterable[str], cache: Path, *, log: Callable[[str], None] = _stderr) -> Path:
    """Make sure ``<root>/<path>/task.json`` exists for every task path (``social_iqa``,
    ``arithmetic/2_digit_addition``); fetch the missing ones in one go. Returns the root."""
    root = bigbench_root(cache)
    missing = sorted({p for p in paths if not (root / p / "task.json").is_file()})
    if missing:
        _fetch(missing, root, subtasks=False, log=log)
    return root


def ensure_bigbench_tree(path: str, cache: Path, *, log: Callable[[str], None] = _stderr) -> list[str]:
    """Fetch BIG-bench task ``path`` (``logical_deduction``, ``logical_deduction/three_objects``)
    with all its subtasks, once; return the paths whose ``task.json`` holds the examples: the task
    itself, or its subtasks where the task's own file has none."""
    if not path or not all(part and part not in (".", "..") for part in path.split("/")):
        raise BigBenchUnavailableError(f"{path!r} is not a BIG-bench task name (say bigbench:social_iqa)")
    root = bigbench_root(cache)
    marker = root / path / TREE_MARKER
    if not marker.is_file():
        _fetch([path], root, subtasks=True, log=log)
        marker.write_text("all subtasks extracted\n")
    own = root / path / "task.json"
    if own.is_file() and read_task_json(own)["examples"]:
        return [path]
    subtasks = sorted(f"{path}/{f.parent.name}" for f in (root / path).glob("*/task.json"))
    if not subtasks:
        raise BigBenchUnavailableError(f"BIG-bench task {path} has no examples and no subtasks")
    return subtasks


def _fetch(paths: Sequence[str], root: Path, *, subtasks: bool, log: Callable[[str], None]) -> None:
    source = os.environ.get(SOURCE_ENV)
    if source:
        extract_tasks(Path(source), paths, root, subtasks=subtasks)
        return
    if BIGBENCH_REQUIREMENT in _failed_downloads:  # one failed download (maybe a long timeout) is enough
        raise BigBenchUnavailableError(_failed_downloads[BIGBENCH_REQUIREMENT])
    log(
        f"fetching {len(paths)} BIG-bench task(s) from the {BIGBENCH_REQUIREMENT} sdist "
        "(one-time download of ~360 MB)..."
    )
    try:
        download_tasks(paths, root, subtasks=subtasks)
    except BigBenchUnavailableError as err:
        _failed_downloads[BIGBENCH_REQUIREMENT] = str(err)
        raise


def download_tasks(paths: Sequence[str], root: Path, *, subtasks: bool = False) -> None:
    """``pip download`` the sdist into a temporary folder and copy ``paths`` out of it."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bigbench-", dir=root.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
               BIGBENCH_REQUIREMENT, "-d", str(Path(tmp) / "dl")]  # fmt: skip
        env = {**os.environ, "TMPDIR": tmp, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        sources = list(Path(tmp).glob("dl/bigbench-*.tar.gz")) + list(Path(tmp).glob(f"pip-*/*/{TASKS_PATH}"))
        if not sources:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BigBenchUnavailableError(
                f"could not download {BIGBENCH_REQUIREMENT} with pip ({tail[0]}); {HOW_TO_GET}"
            )
        extract_tasks(sources[0], paths, root, subtasks=subtasks)


def _wanted(member: str, paths: Sequence[str], subtasks: bool) -> str | None:
    """The task path whose file ``member`` (``<task path>/task.json``) is, if it is wanted: one of
    ``paths``, or with ``subtasks`` a direct subtask of one."""
    folder, _, name = member.rpartition("/")
    if name != "task.json":
        return None
    if folder in paths:
        return folder
    parent = folder.rpartition("/")[0]
    return folder if subtasks and parent in paths else None


def extract_tasks(source: Path, paths: Sequence[str], root: Path, *, subtasks: bool = False) -> None:
    """Copy ``<path>/task.json`` for each path (with ``subtasks``, also ``<path>/<subtask>/task.json``)
    from an unpacked tree, or from a ``.tar.gz`` / ``.zip`` archive (the sdist, or the repository)."""
    found: dict[str, bytes] = {}
    try:
        for member, read in _task_files(source, paths):
            wanted = _wanted(member, paths, subtasks)
            if wanted:
                found[wanted] = read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise BigBenchUnavailableError(f"{source} is damaged ({err}); download it again") from err
    absent = [p for p in paths if p not in found and not any(f.startswith(p + "/") for f in found)]
    if absent:
        raise BigBenchUnavailableError(f"{source} has no task.json for: {', '.join(absent)}")
    for path, data in found.items():
        _write_atomic(root / path / "task.json", data)


def _task_files(source: Path, paths: Sequence[str]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """``(path under benchmark_tasks, reader)`` for the files of ``source`` that may be wanted."""
    if source.is_dir():
        tasks_dir = source if source.name == "benchmark_tasks" else _find_tasks_dir(source)
        for path in paths:
            for file in [tasks_dir / path / "task.json", *(tasks_dir / path).glob("*/task.json")]:
                if file.is_file():
                    yield file.relative_to(tasks_dir).as_posix(), file.read_bytes
    elif not source.is_file():
        raise BigBenchUnavailableError(f"{SOURCE_ENV}: {source} does not exist; {HOW_TO_GET}")
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            for info in tar:
                _, sep, member = info.name.partition(f"{TASKS_PATH}/")
                if sep and info.isfile() and _member_checked(source, member, info.size):
                    yield member, lambda info=info: tar.extractfile(info).read()
    elif zipfile.is_zipfile(source) or source.suffix.lower() == ".zip":  # a cut-off .zip is no zipfile
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                _, sep, member = info.filename.partition(f"{TASKS_PATH}/")
                if sep and not info.is_dir() and _member_checked(source, member, info.file_size):
                    yield member, lambda info=info: archive.read(info)
    else:
        raise BigBenchUnavailableError(
            f"{source} is neither a folder nor a .tar.gz or .zip archive of BIG-bench"
        )


MAX_TASK_FILE_BYTES = 512 * 2**20
"""The largest task.json taken from an archive (BIG-bench's largest is far below): its size, as the
archive declares it, is checked before it is read (and tar and zip read no more than they declare)."""


def _member_checked(source: Path, member: str, size: int) -> bool:
    """True for an archive member that may be read: a relative path that stays in its folder
    and, if it is a task.json, of a bounded size (both refused in one line otherwise)."""
    parts = member.replace("\\", "/").split("/")
    if member.startswith("/") or any(p in ("..", ".") for p in parts):
        raise BigBenchUnavailableError(
            f"{source}: member {member!r} would leave its folder; not a BIG-bench archive"
        )
    if parts[-1] == "task.json" and size > MAX_TASK_FILE_BYTES:
        raise BigBenchUnavailableError(
            f"{source}: {member} is {size / 2**20:,.0f} MiB, more than the {MAX_TASK_FILE_BYTES // 2**20} MiB "
            "a task file may be; not a BIG-bench archive"
        )
    return True


def _find_tasks_dir(tree: Path) -> Path:
    for candidate in (tree / TASKS_PATH, *tree.glob(f"*/{TASKS_PATH}")):
        if candidate.is_dir():
            return candidate
    raise BigBenchUnavailableError(f"no {TASKS_PATH} folder under {tree}")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading task.json


def read_task_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DataFormatError(f"{path}: not a BIG-bench JSON task (no 'examples' list)")
    return data


def template_from_task(data: dict[str, Any], *, list_choices: bool | None = None) -> PromptTemplate:
    """BIG-bench's own formatting fields, with its defaults where a task leaves them out."""
    return PromptTemplate(
        prefix=data.get("task_prefix", ""),
        input_prefix=data.get("example_input_prefix", "\nQ: "),
        output_prefix=data.get("example_output_prefix", "\nA: "),
        choice_prefix=data.get("choice_prefix", "\n  choice: "),
        list_choices=data.get("append_choices_to_input", True) if list_choices is None else list_choices,
    )


def kind_of_task(datas: Sequence[dict[str, Any]]) -> Kind:
    """Multiple choice when every example has ``target_scores``; else numeric when every target is
    a number; else text."""
    examples = [ex for data in datas for ex in data["examples"] if isinstance(ex, dict)]
    if examples and all(isinstance(ex.get("target_scores"), dict) for ex in examples):
        return "multiple_choice"
    targets = [t for ex in examples for t in _as_list(ex.get("target"))]
    return "numeric" if targets and all(is_number(t) for t in targets) else "text"


def _as_list(target: Any) -> list[str]:
    return [target] if isinstance(target, str) else [str(t) for t in target or []]


def shuffled_choices(text: str, choices: list[str], values: list) -> tuple[list[str], list]:
    """The choices (and their scores) in an order drawn from the example's own text. BIG-bench
    stores them in an order that gives the answer away in some tasks (timedial's correct choice is
    always the third, date_understanding's the first in 99 % of examples): listed in the prompt, a
    model learns the position instead of the task, and a majority baseline by position looks strong.
    The order is a pure function of the text, so it is the same on every machine and every run."""
    seed = zlib.crc32(text.encode("utf-8"))
    order = random.Random(seed).sample(range(len(choices)), len(choices))
    return [choices[i] for i in order], [values[i] for i in order]


def records_from_task(data: dict[str, Any], kind: Kind, *, where: str) -> list[dict[str, Any]]:
    """Canonical records with ``input`` rendered by the task's own template (subtasks of one task
    can differ in their instructions): ``target_scores`` (argmax is the answer) for multiple choice,
    ``target`` (a string or a list of references) for numeric and text tasks."""
    template = template_from_task(data, list_choices=None if kind == "multiple_choice" else False)
    records = []
    for i, ex in enumerate(data["examples"]):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise DataFormatError(f"{where}: example {i} has no 'input' string")
        if kind == "multiple_choice":
            scores = ex.get("target_scores")
            if not isinstance(scores, dict) or len(scores) < 2:
                raise DataFormatError(f"{where}: example {i} has no 'target_scores' with 2 or more choices")
            choices, values = shuffled_choices(
                ex["input"], [c.strip() for c in scores], list(scores.values())
            )
            best = max(range(len(values)), key=values.__getitem__)
            records.append(mc_record(template.render(ex["input"].strip(), choices), choices, best))
        else:
            target = ex.get("target")
            if not target:
                raise DataFormatError(f"{where}: example {i} has no 'target'")
            targets = [target] if isinstance(target, str) else list(target)
            records.append(target_record(template.render(ex["input"].strip()), [t.strip() for t in targets]))
    return records
