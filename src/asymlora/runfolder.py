"""Run folders: one process at a time, one run per folder, nothing half-written.

- ``folder_lock``: an exclusive lock (flock) on a run folder while a process writes it; a second
  process waits (compare cells) or is refused (train, federate).
- ``RunFolder.open``: what a new command may do with an existing folder. A folder that holds a
  run is continued only with ``resume`` (and only with the changes the recipe allows, which
  are recorded in ``resumes.jsonl``), started again only with ``overwrite``, and otherwise
  refused; a folder that is not empty and holds no run is never touched. Nothing is written
  until ``RunFolder.start``, which the recipe calls once all its checks have passed.
- ``json_line`` / ``repair_jsonl``: JSON lines without NaN or Infinity tokens, and logs whose last
  line a crash cut short repaired on resume.
- ``counted_cpu`` / ``total_cpu`` / ``cpu_text``: a run's CPU time (results.json's
  ``cpu_seconds``) read back from its files, summed, and said in one line.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .adapters.io import atomic_write
from .config import ConfigError
from .errors import RunFolderError, UsageError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

CONFIG_FILE = "config.yaml"
RESUMES_FILE = "resumes.jsonl"
# What a run of asymlora train or federate leaves in its folder (any one marks a run folder).
RUN_FILES = (CONFIG_FILE, "checkpoint", "checkpoint.old", "metrics.jsonl", "rounds.jsonl", "results.json")
# How to go on from a folder that holds a run, for a command with --resume and --overwrite.
HELD_HINT = "give --resume to continue it, --overwrite to start it again, or another output folder"

_held: dict[tuple[int, Path], int] = {}  # (thread, folder) holding a lock -> nesting depth


@contextmanager
def folder_lock(folder: Path, log: Callable[[str], None] = print, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while the block runs, so that two processes never
    write one run folder at once. The lock file sits beside the folder (``.<name>.lock``), so
    the folder itself may be deleted and made again under the lock. The lock is the operating
    system's (flock) and dies with its process, even on kill -9. ``wait``: wait for another
    process to finish (compare cells: the second then finds the cell finished), else refuse
    with a ``RunFolderError``. Taken again inside the block by the same thread, it is held
    already. Where there is no flock (Windows) nothing is locked."""
    path = Path(folder).resolve()
    check_is_folder(path)
    key = (threading.get_ident(), path)
    if fcntl is None or key in _held:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _release(key)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_file(path), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise RunFolderError(
                    f"{folder} is in use by another asymlora process",
                    hint="wait for it to finish, or choose another output folder",
                ) from None
            log(f"waiting: another process is running {folder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        _held[key] = 1
        try:
            yield
        finally:
            _release(key)


def folder_busy(folder: Path) -> bool:
    """Whether another process holds ``folder_lock(folder)`` right now (a glance: it may be taken
    or let go the moment after). A folder this thread holds is not busy."""
    path = Path(folder).resolve()
    lock = _lock_file(path)
    if fcntl is None or (threading.get_ident(), path) in _held or not lock.exists():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _lock_file(path: Path) -> Path:
    """Where ``folder_lock`` of the resolved folder ``path`` keeps its lock: beside the folder."""
    return path.parent / f".{path.name}.lock"


def check_is_folder(path: Path) -> None:
    """Refuse a path that is a file or lies below one (before anything is made there)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise RunFolderError(f"{existing} is a file, not a folder", hint="choose another output folder")


def _release(key: tuple[int, Path]) -> None:
    _held[key] -= 1
    if not _held[key]:
        del _held[key]


# --- configs of a run folder ----------------------------------------------------------------------
def config_differences(have: Any, want: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved, new)}`` for every leaf where two config dicts differ."""
    if isinstance(have, dict) and isinstance(want, dict):
        return {
            key: pair
            for name in dict.fromkeys([*have, *want])
            for key, pair in config_differences(have.get(name), want.get(name), f"{prefix}{name}.").items()
        }
    return {} if have == want else {prefix.rstrip("."): (have, want)}


def config_changes(cfg: Any, save_config: Callable[[Any, Path], None]) -> dict[str, tuple[Any, Any]]:
    """How ``cfg`` differs from the ``config.yaml`` in its output folder (none if there is none),
    leaving out ``output_dir``: where a run is, not what it is (folders move)."""
    saved = Path(cfg.output_dir) / CONFIG_FILE
    if not saved.is_file():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / CONFIG_FILE)
        want = yaml.safe_load((Path(tmp) / CONFIG_FILE).read_text())
    try:
        have = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RunFolderError(
            f"{saved} is damaged ({type(err).__name__}); not a run folder to continue"
        ) from None
    have = have if isinstance(have, dict) else {"": have}
    have.pop("output_dir", None), want.pop("output_dir", None)
    changes = config_differences(have, want)
    return {k: pair for k, pair in changes.items() if not _added_at_default(type(cfg), k, have, pair[1])}


def _added_at_default(cls: type, key: str, saved: dict, value: Any) -> bool:
    """Whether ``key`` is a setting added since the run was saved (absent from its config.yaml)
    that keeps its default here: the run was made with the behaviour that default stands for."""
    *parents, name = key.split(".")
    for part in parents:
        saved = saved.get(part) if isinstance(saved, dict) else None
        cls = typing.get_type_hints(cls).get(part) if is_dataclass(cls) else None
    if not isinstance(saved, dict) or name in saved or not is_dataclass(cls):
        return False
    spec = {f.name: f for f in fields(cls)}.get(name)
    return spec is not None and spec.default is not MISSING and spec.default == value


def _listed(changes: dict[str, tuple[Any, Any]], n: int = 6) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:n])


def check_same_config(cfg: Any, save_config: Callable[[Any, Path], None]) -> None:
    """Refuse to skip or resume a compare cell whose folder holds a run made with another config
    (say another step count): its results would be reported under the new settings."""
    changes = config_changes(cfg, save_config)
    if changes:
        raise ConfigError(
            f"{cfg.output_dir} holds a run made with another config ({_listed(changes)}): "
            "give another --out, or delete that folder to run it again"
        )


# --- claiming a run folder -----------------------------------------------------------------------
def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


FOLDER_KINDS = {
    "federation": "a federation (asymlora federate)",
    "run": "a training run (asymlora train)",
    "grid": "a grid of runs (asymlora compare, or federate --methods)",
    "evaluation": "an evaluation (asymlora eval)",
    "export": "an exported adapter (asymlora export)",
    "other": "files that asymlora did not write",
}


def is_federation(path: Path) -> bool:
    """Whether ``path`` holds a run of asymlora federate (one adapter per client)."""
    return (path / "rounds.jsonl").exists() or (path / "clients.json").exists()


def folder_kind(path: Path) -> str | None:
    """What an existing folder holds, one of ``FOLDER_KINDS``, from the files each command leaves
    (None: missing or empty). A grid is known by its cells (``<method>/seed-<n>/``) or its table."""
    path = Path(path)
    if not path.is_dir() or not any(not p.name.startswith(".") for p in path.iterdir()):
        return None  # missing, empty, or only the lock files of folders in it
    if is_federation(path):
        return "federation"
    if any((path / name).exists() for name in RUN_FILES if name != "results.json"):
        return "run"
    if (path / "tasks.jsonl").exists():
        return "evaluation"
    if (path / "adapter_config.json").exists() or (path / "asymlora_config.json").exists():
        return "export"
    if any(path.glob("*/seed-*")) or any(path.glob("*/.seed-*.lock")):  # a cell, or a cell's lock
        return "grid"
    results = _json_keys(path / "results.json")
    if {"methods", "seeds"} <= results:
        return "grid"
    if "tasks_requested" in results:
        return "evaluation"
    return "other"


def _json_keys(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def check_out(out: Path, kind: str, command: str, *, overwrite: bool | None = None) -> None:
    """Refuse an output folder that holds another kind of thing than ``command`` writes (``kind``),
    which it would replace in part; with ``overwrite`` False (a command that has the flag), also
    one that holds a result of its own kind. Checked before anything is written."""
    check_is_folder(Path(out))
    held = folder_kind(out)
    if held is None:
        return
    if held != kind:
        raise RunFolderError(
            f"--out {out} holds {FOLDER_KINDS[held]}, which {command} would overwrite",
            hint="choose another output folder",
        )
    if overwrite is False:
        raise RunFolderError(
            f"--out {out} holds an earlier {kind}",
            hint="give --overwrite to replace it, or another output folder",
        )


@dataclass
class RunFolder:
    """A run folder checked for use (``open``), written from ``start`` on."""

    path: Path
    save_config: Callable[[Any, Path], None]
    cfg: Any
    resume: bool
    overwrite: bool
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        cfg: Any,
        save_config: Callable[[Any, Path], None],
        *,
        resume: bool = False,
        overwrite: bool = False,
        may_change: tuple[str, ...] = (),
        held: tuple[str, str] = ("", HELD_HINT),
    ) -> RunFolder:
        """Check what this run may do with ``cfg.output_dir``, writing nothing. ``may_change``:
        the config keys (or sections, ``eval``) a resume may change. ``held``: what the refusal
        of a folder that holds a run adds to its message, and its hint (for an engine whose runs
        cannot resume, or whose flags have other names)."""
        path = Path(cfg.output_dir)
        if resume and overwrite:
            raise UsageError("give --resume (continue the run) or --overwrite (start again), not both")
        check_is_folder(path)
        folder = cls(path, save_config, cfg, resume, overwrite)
        if not path.is_dir() or not any(path.iterdir()):
            return folder
        if not holds_run(path):
            raise RunFolderError(
                f"{path} is not empty and holds no asymlora run; nothing in it is touched",
                hint="choose a new or empty output folder",
            )
        if overwrite:
            return folder
        if not resume:
            raise RunFolderError(f"{path} holds a run already{held[0]}", hint=held[1])
        folder.changes = config_changes(cfg, save_config)
        refused = {k: v for k, v in folder.changes.items() if not _allowed(k, may_change)}
        if refused:
            raise RunFolderError(
                f"--resume: {path} was run with another config ({_listed(refused)}); a resume may only "
                f"change {', '.join(may_change) or 'nothing'}",
                hint="undo the change, or give --overwrite to start again with the new config",
            )
        return folder

    def start(self, at: int, log: Callable[[str], None] = print) -> None:
        """Write the folder's config (after the caller's checks): clear the folder first with
        ``overwrite``; on a resume, only where it changes allowed keys, recording them in
        resumes.jsonl with ``at``, the step or round the run continues from (a resume without
        changes leaves config.yaml as it was, the path it names included)."""
        if self.overwrite and self.path.is_dir():
            log(f"overwrite: deleting the run in {self.path}")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.changes:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from": at}
            record["changed"] = {k: {"from": old, "to": new} for k, (old, new) in self.changes.items()}
            with (self.path / RESUMES_FILE).open("a", encoding="utf-8") as f:
                f.write(json_line(record))
            log(f"resumed with changes: {_listed(self.changes)} (recorded in {RESUMES_FILE})")
        if not self.resume or self.changes or not (self.path / CONFIG_FILE).exists():
            atomic_write(self.path / CONFIG_FILE, lambda tmp: self.save_config(self.cfg, Path(tmp)))


def _allowed(key: str, may_change: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in may_change)


# --- JSON lines -----------------------------------------------------------------------------------
def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, as standard JSON has
    no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_line(record: Any) -> str:
    """One line of standard JSON (non-finite numbers as null), newline included."""
    return json.dumps(finite(record), allow_nan=False) + "\n"


def write_jsonl(path: Path, records: list[Any]) -> None:
    """``records`` as a JSON-lines file, replaced at once (a reader never sees half of it)."""
    text = "".join(json_line(r) for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def repair_jsonl(path: Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite a JSON-lines log with only the records ``keep`` accepts, dropping lines that do
    not parse (the last line, cut short by a crash mid-write); returns how many lines went."""
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [line for line in lines if _keeps(line, keep)]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
    return len(lines) - len(kept)


def _keeps(line: str, keep: Callable[[dict], bool]) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and keep(record)


def counted_cpu(value: Any) -> float | None:
    """A count of CPU seconds read from a file (a checkpoint's, a round record's): a finite number
    >= 0, or None (not counted: written before runs counted it, or not a valid count)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def total_cpu(values: Iterable[Any]) -> float | None:
    """The sum of counts of CPU seconds; None when there is none or one is not counted (a partial
    sum is never passed off as the whole)."""
    counts = [counted_cpu(v) for v in values]
    return None if not counts or None in counts else sum(counts)


def result_cpu(result: Any) -> float | None:
    """A run's CPU seconds in all, from its results.json content (``cpu_seconds``: one count per
    part); None when any part, or the whole, was not counted."""
    cpu = result.get("cpu_seconds") if isinstance(result, dict) else None
    return total_cpu(cpu.values()) if isinstance(cpu, dict) else None


def cpu_text(cpu: dict[str, float | None]) -> str:
    """``{"train": 5376.0, "evaluation": 612.0}`` -> "CPU time: train 89.6 min, evaluation 10.2 min;
    99.8 min in all (this process, all its threads)". A part not counted (None: it ran before runs
    counted it) is named so, and then no total is given."""
    parts = [f"{k} {v / 60:.1f} min" if v is not None else f"{k} not counted" for k, v in cpu.items()]
    known = [v for v in cpu.values() if v is not None]
    total = f"; {sum(known) / 60:.1f} min in all" if len(known) == len(cpu) else ""
    return f"CPU time: {', '.join(parts)}{total} (this process, all its threads)"
