"""What ``asymlora eval`` scores: a base model, or a base model with an adapter read from a PEFT
LoRA folder, an asymlora adapter folder or a run folder; and, for adapters routed by task, which
adapter task answers each evaluated task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.config import AdapterConfig
from ..adapters.io import (
    EXPORT_INFO_FILE,
    PEFT_CONFIG_FILE,
    folder_format,
    native_config_file,
    read_peft_lora,
)
from ..config import ConfigError, read_json
from ..data.task import Task
from ..errors import AsymloraError, MissingFileError
from ..runfolder import check_out, folder_busy, folder_kind, is_federation
from .generate import resolve_task


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    base: str
    description: str
    router: str | None = None  # the adapter's router ("task": questions are routed by task)
    task_names: list[str] | None = None  # the adapter's tasks, in task-id order, where known
    run_tasks: Any = None  # the RunTasks of the run the adapter comes from, where known

    @property
    def route_names(self) -> list[str]:
        """What each adapter task is called: its task name where known, else its index."""
        return self.task_names or [str(i) for i in range(self.model.adapter_config.num_experts)]


def adapter_kind(path: Path) -> str:
    """``run`` (a folder of asymlora train), ``asymlora`` or ``peft``; a one-line error otherwise."""
    if not path.is_dir():
        raise MissingFileError(f"--adapter {path}: no such folder")
    if is_federation(path):
        raise ConfigError(
            f"--adapter {path}: a federate run holds one adapter per client; pass {path}/adapters/<client>"
        )
    if is_run_folder(path):
        return "run"
    kind = folder_format(path)
    if kind is None:
        raise MissingFileError(
            f"--adapter {path}: not an adapter folder (no asymlora_config.json or {PEFT_CONFIG_FILE}) "
            "and not a run folder (config.yaml and adapter/)"
        )
    return kind


def is_run_folder(path: Path) -> bool:
    """A folder of asymlora train: its config.yaml and its adapter/."""
    return (path / "config.yaml").is_file() and (path / "adapter").is_dir()


def recorded_base(path: Path, kind: str) -> str | None:
    """The base model an adapter folder names: the asymlora name that loads its exact weights where
    an export recorded one, else its ``base_model_name_or_path``."""
    if kind == "asymlora":
        return AdapterConfig.load(native_config_file(path)).base_model_name_or_path
    info = path / EXPORT_INFO_FILE
    if info.is_file():
        data = read_json(info)
        base = data.get("asymlora_base") if isinstance(data, dict) else None
        return base if isinstance(base, str) else None
    return read_peft_lora(path).base_model_name_or_path


def _is_adapter_folder(name: str | None) -> bool:
    return name is not None and Path(name).is_dir() and folder_format(name) is not None


def load_for_eval(
    model_name: str | None, adapter: Path | None, device: str | None = None, dtype: str | None = None
) -> LoadedModel:
    """The model to evaluate and its tokenizer, which always comes from the base model (an adapter
    folder holds none). ``device`` and ``dtype`` (None: as train does, a run folder's own settings,
    else ``auto``) place the base model."""
    from ..adapters import load_adapter
    from .multitask import load_run

    if _is_adapter_folder(model_name):
        raise ConfigError(
            f"--model {model_name} is an adapter folder, not a model (it has no weights of its own and no "
            f"tokenizer): pass it as --adapter {model_name}, with --model BASE if it does not record its base"
        )
    if adapter is None:
        model, tokenizer = load_placed(model_name, device, dtype)
        return LoadedModel(model, tokenizer, model_name, model_name)
    kind = adapter_kind(adapter)
    if kind == "run":
        model, tokenizer, cfg, names = load_run(adapter, model=model_name, device=device, dtype=dtype)
        base = model_name or cfg.model
        return LoadedModel(model, tokenizer, base, f"{cfg.adapter.method} run {adapter} on {base}",
                           cfg.adapter.router, names, _tasks_of_run(adapter))  # fmt: skip
    base = model_name or recorded_base(adapter, kind)
    if not base:
        raise ConfigError(f"--adapter {adapter} does not record its base model: give --model BASE")
    model, tokenizer = load_placed(base, device, dtype)
    wrapped = load_adapter(model, adapter).eval()
    cfg = wrapped.adapter_config
    what = "PEFT LoRA" if kind == "peft" else f"{cfg.method} adapter"
    tasks = _tasks_of_run(adapter.parent) if cfg.router == "task" else None
    names = tasks.names if tasks else None
    return LoadedModel(wrapped, tokenizer, base, f"{what} {adapter} on {base}", cfg.router, names, tasks)


def load_placed(name: str, device: str | None, dtype: str | None):
    """Base model ``name`` and its tokenizer, the model on ``device`` in ``dtype`` (None: ``auto``,
    as train's defaults are)."""
    from ..models import load_model, resolve_device

    where = resolve_device(device or "auto", "--device")
    model, tokenizer = load_model(name, dtype=dtype or "auto")
    return model.to(where), tokenizer


def _tasks_of_run(folder: Path):
    """The ``RunTasks`` of the train run an adapter folder lies in (its adapter/, or the checkpoint/
    of a run still training), or None: not in a run, or its tasks cannot be read (its task files
    moved: ``--route`` still works then)."""
    from .multitask import run_tasks

    if not (folder / "config.yaml").is_file():
        return None
    try:
        return run_tasks(folder)
    except AsymloraError:
        return None


def route_tasks(loaded: LoadedModel, tasks: list[Task], route: str | None) -> dict[str, int] | None:
    """Task name -> adapter task id for a task-routed adapter (``route`` for all, else the adapter
    task of the same name); None for any other model."""
    if loaded.router != "task":
        if route is not None:
            raise ConfigError(f"--route: {loaded.description} does not route by task; leave --route out")
        return None
    num_experts = loaded.model.adapter_config.num_experts
    names = loaded.route_names
    if route is not None:
        task_id = resolve_task(route, names, "task", flag="--route")
        return {t.name: task_id for t in tasks}
    if loaded.run_tasks is not None and any(loaded.run_tasks.questions):
        return {t.name: _expert_by_questions(t, loaded.run_tasks) for t in tasks}
    unknown = [t.name for t in tasks if t.name not in names]
    if unknown:
        known = ", ".join(loaded.task_names) if loaded.task_names else f"ids 0..{num_experts - 1}, unnamed"
        where = "" if loaded.task_names else " (or pass the run folder that trained it: it names its tasks)"
        raise ConfigError(
            f"--route: this adapter routes by task and has no task named {', '.join(unknown)} "
            f"(its tasks: {known}); give --route NAME_OR_INDEX{where}"
        )
    return {t.name: names.index(t.name) for t in tasks}


def _expert_by_questions(task: Task, run) -> int:
    """The expert of ``run`` (a ``RunTasks``) whose task posed the same test questions as ``task``
    (the same first ``limit`` questions of the same split): the task's identity, whatever the
    order or the names of the arguments. Where two experts' tasks had the same questions, the one
    of the same name; a task matching none is refused."""
    from ..eval.runner import scored_questions, test_examples

    digest = scored_questions(task, test_examples(task, seed=run.seed, limit=run.limit))
    same = [i for i, q in enumerate(run.questions) if q == digest]
    if len(same) > 1:
        same = [i for i in same if run.names[i] == task.name] or same[:1]
    if same:
        return same[0]
    why = (f"the run's task {task.name} posed other questions (its data, template or split changed, or "
           "it is another file of the same name)" if task.name in run.names else
           f"no task of the run posed its questions (its tasks: {', '.join(run.names)})")  # fmt: skip
    raise ConfigError(f"task {task.name}: {why}; give --route NAME_OR_INDEX to score it with one expert")


def check_eval_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an output folder that is a file (or lies below one), or that holds anything but an
    evaluation (a run, a grid, an export: its results.json would be overwritten), or without
    ``overwrite`` an earlier evaluation."""
    check_out(out, "evaluation", "asymlora eval", overwrite=overwrite)


def default_eval_out(name: str) -> Path:
    """``runs/eval/<name>``, or where that holds something already, the first of ``<name>-2``,
    ``<name>-3``, ... that does not: a default folder never replaces an earlier result."""
    base = Path("runs") / "eval" / name
    out, n = base, 2
    while folder_kind(out) is not None or folder_busy(out):
        out, n = base.with_name(f"{name}-{n}"), n + 1
    return out


def describe_split(split: str, seed: int, limit: int | None) -> str:
    """One line on what is scored: which split, of which share of each task, how many at most."""
    cap = f", at most {limit} per task" if limit else ""
    if split == "all":
        return f"scoring every example of each task (training examples included){cap}"
    return f"scoring each task's test split (split seed {seed}; 20% of its examples by default){cap}"
