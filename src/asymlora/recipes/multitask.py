"""Multi-task fine-tuning, top to bottom: one adapter (LoRA, ALoRA, HydraLoRA or MoLA) trained on
several tasks at once, evaluated on each task's test split, saved, exported per task.

Everything lands in one run folder::

    config.yaml          the resolved configuration (re-run with --config RUN/config.yaml)
    adapter_init/        the adapter before training (for `asymlora analyze change`)
    metrics.jsonl        loss, learning rate, throughput per step (learned routers: each module's gate
                         usage and entropy, docs/router.md); with eval.every each evaluation
                         (the final one too) as {"step", "eval": {...}} (see train_eval.py)
    loss.png             the training loss curve
    tensorboard/         loss, evaluations, the config (text) and hyperparameters (HParams) for
                         TensorBoard (with the tensorboard extra)
    adapter-best/        with eval.keep_best: the adapter of the best average score, and best.json
    checkpoint/          the latest checkpoint (--resume continues from it)
    adapter/             the trained adapter (asymlora format)
    peft/<task>/         each task's adapter as a PEFT LoRA folder with a model card (README.md),
                         where routing allows: lora, or router=task; not the default softmax router
    results.json         per-task scores, average, worst task, std (results.md: the same as a table)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..adapters import AdapterConfig, export_peft, load_adapter, save_adapter, wrap
from ..adapters.io import peft_export_problem
from ..config import ConfigError, Override, apply_overrides, from_dict, merge, read_file, read_json, to_dict
from ..data.registry import get_suite, get_tasks
from ..data.task import Task, training_examples
from ..errors import InputError, MissingFileError
from ..eval.config import TrainingEvalConfig
from ..eval.report import Report
from ..eval.runner import evaluate_tasks, majority_report
from ..models import DTYPE_CHOICES, check_base_settings, load_model, placement, portable_name, resolve_device
from ..runfolder import RunFolder, cpu_text, folder_lock
from ..threads import use_threads
from ..train import TrainConfig, train
from ..train.loop import log_evaluation, resume_point, tensorboard_writer
from ..train.processes import Process, init_process, rank_zero_first, wait_for_rank_zero
from .train_eval import BEST_FOLDER, TrainingEvaluation, best_so_far, log_config, log_hparams


@dataclass
class DataConfig:
    suite: str = field(default="commonsense", metadata={"help": "a named suite (asymlora tasks lists them)"})
    tasks: list[str] = field(
        default_factory=list, metadata={"help": "task names or files; when given, used instead of the suite"}
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the train/test split"})
    max_train_per_task: int | None = field(
        default=None, metadata={"help": "cap on training examples per task"}
    )
    group_splits: bool = field(
        default=True,
        metadata={"help": "keep examples of one item (winowhy: one sentence) on one side of the split"},
    )

    def __post_init__(self) -> None:
        if not self.tasks and not self.suite:
            raise ConfigError("data: give data.suite or data.tasks")
        if self.max_train_per_task is not None and self.max_train_per_task < 1:
            raise ConfigError(f"data.max_train_per_task={self.max_train_per_task} must be >= 1")


@dataclass
class MultitaskConfig:
    model: str = field(
        default="smollm2-135m", metadata={"help": "smollm2-135m, tiny-llama, a folder or a hub id"}
    )
    dtype: str = field(default="auto", metadata={"help": f"base weights' dtype: {' | '.join(DTYPE_CHOICES)}"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available) | cpu | cuda"})
    output_dir: str = "runs/multitask"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: TrainingEvalConfig = field(default_factory=TrainingEvalConfig)

    def __post_init__(self) -> None:
        check_base_settings(self.dtype, self.device)
        # a local folder by its absolute path, so that the run folder loads from anywhere
        self.model = portable_name(self.model)
        if self.adapter.model_type is not None:
            raise ConfigError("adapter.model_type is filled in from the model; leave it out")
        if self.eval.every is not None and self.eval.every > self.train.steps:
            raise ConfigError(
                f"eval.every={self.eval.every} is more than train.steps={self.train.steps}: no evaluation "
                "would fall during training (leave it out to evaluate only at the end)"
            )


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str | Override] | None = None,
    base: dict | None = None,
) -> MultitaskConfig:
    """Defaults, then ``base`` (a dict), then the file, then ``section.key=value`` overrides."""
    data = merge(base or {}, read_file(path) if path else {})
    return from_dict(MultitaskConfig, apply_overrides(data, overrides or []))


def config_dict(cfg: MultitaskConfig) -> dict[str, Any]:
    """The config as a run's config.yaml holds it (the adapter's fields filled in from the model
    left out)."""
    data = to_dict(cfg)
    data["adapter"] = {
        k: v for k, v in data["adapter"].items() if k not in ("model_type", "base_model_name_or_path")
    }
    return data


def save_config(cfg: MultitaskConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))


def select_tasks(data: DataConfig) -> list[Task]:
    """The config's tasks, each under a name of its own (see ``get_tasks``)."""
    tasks = get_tasks(data.tasks) if data.tasks else get_suite(data.suite)
    return tasks if data.group_splits else [replace(t, group=None) for t in tasks]


def check_routing(cfg: MultitaskConfig, n_tasks: int) -> None:
    a = cfg.adapter
    if a.router == "task" and a.num_experts != n_tasks:
        raise ConfigError(
            f"adapter.router='task' needs one expert per task: adapter.num_experts={a.num_experts} "
            f"but there are {n_tasks} tasks"
        )


# What a --resume may change: settings that do not touch the training already done.
RESUMABLE = ("eval", "train.save_every", "train.log_every", "train.threads")


def run(cfg: MultitaskConfig, resume: bool = False, log=print, overwrite: bool = False) -> dict[str, Any]:
    """Train, evaluate, save and export; returns results.json's content. The output folder is
    locked while the run writes it; one that holds a run already is continued with ``resume``
    (changing only ``RESUMABLE`` settings), started again with ``overwrite``, else refused.
    Nothing is written before the tasks, the model and the adapter's size have been checked.
    Under torchrun, rank 0 does all this; the other ranks wait for it to claim the folder, train
    beside it, write nothing and return an empty dict."""
    proc = init_process()
    if not proc.main:
        return follow_rank_zero(cfg, proc, resume)
    out = Path(cfg.output_dir)
    with ExitStack() as held:
        with rank_zero_first(proc):
            held.enter_context(folder_lock(out, log, wait=False))
            folder = RunFolder.open(
                cfg, save_config, resume=resume, overwrite=overwrite, may_change=RESUMABLE
            )
            use_threads(cfg.train.threads, log)
            tasks, examples, model, tokenizer = prepare(cfg)
            folder.start(resume_point(out, cfg.train, len(tasks)) if resume else 0, log)
        log(
            f"run folder: {out}"
            + (f" (rank 0 of {proc.world_size} processes)" if proc.world_size > 1 else "")
        )
        log(f"model: {cfg.model} on {placement(model)}")
        log(f"tasks: {', '.join(t.name for t in tasks)}")
        log(f"{cfg.adapter.method} on {len(model.adapted)} modules; {model.trainable_parameters()}")
        return train_and_report(cfg, model, tokenizer, tasks, examples, resume, log)


def follow_rank_zero(cfg: MultitaskConfig, proc: Process, resume: bool) -> dict[str, Any]:
    """A torchrun rank other than 0: once rank 0 has claimed the run folder, the same model and
    data, trained beside rank 0 (``train`` sums the gradients); nothing written, nothing logged."""
    wait_for_rank_zero(proc)
    use_threads(cfg.train.threads, log=lambda _: None)
    _, examples, model, tokenizer = prepare(cfg)
    train(model, tokenizer, examples, cfg.train, cfg.output_dir, resume=resume)
    return {}


def prepare(cfg: MultitaskConfig):
    """The tasks, their training examples, the wrapped model (on its device) and the tokenizer,
    each checked: the device first, the routing against the tasks, the adapter's ranks against
    the model."""
    where = resolve_device(cfg.device)
    tasks = select_tasks(cfg.data)
    check_routing(cfg, len(tasks))
    examples = training_examples(tasks, cfg.data.split_seed, cfg.data.max_train_per_task)
    from .dryrun import check_memory

    check_memory(cfg, len(tasks), where)  # the ranks against the layers too, on the meta device
    base, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    return tasks, examples, wrap(base.to(where), cfg.adapter, n_tasks=len(tasks)), tokenizer


def adapter_ranks(cfg: MultitaskConfig) -> dict[str, int]:
    """The adapter's ranks, by setting name, that must fit the model's layers."""
    factored = {"adapter.d_m": cfg.adapter.d_m} if cfg.adapter.method == "factored" else {}
    return {"adapter.r": cfg.adapter.r} | factored


def train_and_report(cfg: MultitaskConfig, model, tokenizer, tasks, examples, resume: bool, log) -> dict:
    out = Path(cfg.output_dir)
    if not (out / "adapter_init").exists():
        save_adapter(model, out / "adapter_init")
    task_ids = {t.name: i for i, t in enumerate(tasks)}
    tracked = TrainingEvaluation(
        model, tokenizer, tasks, cfg.train, cfg.eval, cfg.data.split_seed, out,
        score=lambda: evaluate(model, tokenizer, tasks, cfg, task_ids, log=lambda _: None),
    )  # fmt: skip
    trained = train(model, tokenizer, examples, cfg.train, out, resume, evaluation=tracked.during_training())
    plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.adapter.method} on {cfg.model}")
    log(f"evaluating on {len(tasks)} test splits (up to {cfg.eval.limit or 'all'} examples each)")
    save_adapter(model, out / "adapter")

    eval_start = time.process_time()
    report = evaluate(model, tokenizer, tasks, cfg, task_ids, log)
    final = tracked.numbers(cfg.train.steps, report)
    report.majority = majority_report(tasks, seed=cfg.data.split_seed, limit=cfg.eval.limit)
    scores = [{"task": r.task, "metric": r.metric, "score": r.score, "n": r.n} for r in report.results]
    exported = export_per_task(model, tasks, out / "peft", scores, card_context(cfg, [t.name for t in tasks]))
    no_export = peft_export_problem(cfg.adapter)
    report.info.update(
        method=cfg.adapter.method,
        model=cfg.model,
        seed=cfg.adapter.seed,
        trainable_parameters=model.trainable_parameters().trainable,
        peft_exports=exported,
        no_peft_export=no_export,
        cpu_seconds={"train": trained["cpu_seconds"], "evaluation": time.process_time() - eval_start},
        **({"best": best_so_far(out)} if cfg.eval.keep_best else {}),
    )
    report.save(out / "results.json")
    (out / "results.md").write_text(f"{report.to_markdown()}\n\n{cpu_text(report.info['cpu_seconds'])}\n")
    log_end(cfg, final)
    log(report.to_markdown())
    log(cpu_text(report.info["cpu_seconds"]))
    log(f"results: {out / 'results.json'}")
    log(
        f"PEFT LoRA folders: {out / 'peft'} ({', '.join(exported)})"
        if exported
        else f"no PEFT export: {no_export}"
    )
    if cfg.eval.keep_best:
        best = report.info["best"]
        log(f"best adapter: step {best['step']} (average {best['eval']['average']:.2f}): {out / BEST_FOLDER}")
    return report.to_dict(predictions=False)


def evaluate(model, tokenizer, tasks: list[Task], cfg: MultitaskConfig, task_ids=None, log=print) -> Report:
    """Score ``model`` on each task's test questions as the config says (``task_ids``: the adapter
    routed to each task name)."""
    return evaluate_tasks(
        model,
        tokenizer,
        tasks,
        task_ids=task_ids,
        progress=lambda r: log(f"  evaluated {r.task}: {r.metric} {r.score:.2f} (n={r.n})"),
        limit=cfg.eval.limit,
        seed=cfg.data.split_seed,
        batch_size=cfg.eval.batch_size,
        max_length=cfg.eval.max_length,
    )


def export_per_task(
    model, tasks: list[Task], folder: Path, scores: list[dict] | None = None, context: dict | None = None
) -> list[str]:
    """Each task's LoRA as a PEFT folder with its model card (``context``: ``card_context``), where
    the routing makes it a plain LoRA (``peft_export_problem`` says why not otherwise)."""
    cfg = model.adapter_config
    if peft_export_problem(cfg):
        return []
    if cfg.method == "lora":
        card = {"task": "all tasks", "scores": scores or [], **(context or {})}
        export_peft(model, folder / "all-tasks", card=card)
        return ["all-tasks"]
    for task_id, task in enumerate(tasks):
        own = [s for s in scores or [] if s["task"] == task.name]
        card = {"task": task.name, "scores": own, **(context or {})}
        export_peft(model, folder / task.name, task=task_id, card=card)
    return [t.name for t in tasks]


def card_context(cfg: MultitaskConfig, task_names: list[str]) -> dict[str, Any]:
    """What an export's model card says of its training: the data (the tasks in task-id order and
    the config's data section) and the settings (model, dtype, adapter, train)."""
    saved = config_dict(cfg)
    data = {k: v for k, v in saved["data"].items() if k != "suite" or not cfg.data.tasks}  # the one used
    return {
        "data": {"task_names": task_names, **data},
        "settings": {key: saved[key] for key in ("model", "dtype", "adapter", "train")},
    }


def log_end(cfg: MultitaskConfig, scores: dict[str, float]) -> None:
    """The final evaluation into TensorBoard, with the run's config (as text) and hyperparameters,
    and (with ``eval.every``, beside the evaluations during training) into metrics.jsonl. At the
    end, so that a run refused on its resume writes nothing."""
    out = Path(cfg.output_dir)
    writer = tensorboard_writer(out)
    log_evaluation(out if cfg.eval.every else None, cfg.train.steps, scores, writer)
    config = config_dict(cfg)
    if writer is not None:
        with writer:
            log_config(writer, config, cfg.train.steps)
            log_hparams(writer, config, scores)


def plot_loss(metrics: Path, path: Path, title: str = "") -> Path | None:
    """The training loss per optimizer step from ``metrics.jsonl``, as a PNG."""
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]  # not the evaluations
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], "-", marker="." if len(rows) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean token loss")
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SCORE_KEYS = ("task", "metric", "score", "n")


def run_scores(run_dir: str | Path) -> list[dict[str, Any]]:
    """``[{task, metric, score, n}]`` from a finished run's results.json (empty before it exists);
    a results.json without them is refused, naming it."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return []
    data = read_json(path)
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not (
        isinstance(tasks, list) and all(isinstance(t, dict) and set(SCORE_KEYS) <= t.keys() for t in tasks)
    ):
        raise InputError(
            f"{path}: not the results.json of a run (expected a list of task scores under 'tasks')"
        )
    return [{k: t[k] for k in SCORE_KEYS} for t in tasks]


def load_run(
    run_dir: str | Path, model: str | None = None, device: str | None = None, dtype: str | None = None
):
    """The trained model of a run folder (base + adapter), its tokenizer, config and task names.
    ``model`` loads another base (say a local copy of the run's) instead of the one it names;
    ``device`` and ``dtype`` (``--device``, ``--dtype``) replace the run's own settings."""
    run_dir = Path(run_dir)
    where = resolve_device(device, "--device") if device else None  # checked first
    if not (run_dir / "config.yaml").is_file():
        raise MissingFileError(
            f"{run_dir}: not a run folder (no config.yaml); pass the folder `asymlora train` wrote"
        )
    cfg = load_config(run_dir / "config.yaml")
    where = where or resolve_device(cfg.device)
    base, tokenizer = load_model(model or cfg.model, dtype=dtype or cfg.dtype)
    model = load_adapter(base.to(where), run_dir / "adapter").eval()
    return model, tokenizer, cfg, run_task_names(run_dir, cfg)


def run_task_names(run_dir: Path, cfg: MultitaskConfig | None = None) -> list[str]:
    """The tasks of a run folder in task-id order: those its results name, else its config's."""
    return run_tasks(run_dir, cfg).names


@dataclass(frozen=True)
class RunTasks:
    """The tasks a run trained, in task-id order, each with the digest of the test questions its
    results scored it on (None where the run has no results yet): ``seed`` and ``limit`` chose
    those questions. A task's name can change with the order of the arguments that name it (two
    files ``t.jsonl``), its questions cannot, so the digest is what identifies an expert's task."""

    names: list[str]
    questions: list[str | None]
    seed: int
    limit: int | None


def run_tasks(run_dir: Path, cfg: MultitaskConfig | None = None) -> RunTasks:
    """A run folder's ``RunTasks``: from its results where it has them, else from its config."""
    cfg = cfg or load_config(Path(run_dir) / "config.yaml")
    path = Path(run_dir) / "results.json"
    entries = read_json(path).get("tasks", []) if run_scores(run_dir) else []
    if entries:
        names = [e["task"] for e in entries]
        questions = [e.get("questions") if isinstance(e.get("questions"), str) else None for e in entries]
    else:
        names = [t.name for t in select_tasks(cfg.data)]
        questions = [None] * len(names)
    return RunTasks(names, questions, cfg.data.split_seed, cfg.eval.limit)
