"""Compare methods under one budget: every (method, seed) cell is a multitask run in its own
folder (finished cells are skipped on a re-run), then one table, one JSON and one bar chart.

    OUT/<method>/seed-<s>/        a full multitask run folder per cell
    OUT/single-task/<task>/seed-<s>/   single-task LoRA baselines (--single-task-baseline same)
    OUT/single-task-share/<task>/seed-<s>/   the same, each for its share of the steps (share)
    OUT/results.json, OUT/results.md, OUT/results.png
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters import METHODS
from ..adapters.config import OWN_METHODS, REFUSED_METHODS, is_anchor
from ..adapters.model import matching_rank, planned_size
from ..adapters.peft_anchors import anchor_settings
from ..config import ConfigError, to_dict
from ..data.task import Task, training_examples
from ..eval.report import (
    check_same_questions,
    delta_m,
    most_frequent_answer_share,
    question_scores,
)
from ..eval.runner import majority_report, scored_questions, test_examples
from ..eval.stats import Table, interval_text
from ..models import load_model, resolve_device
from ..progress import progress_bar
from ..runfolder import check_same_config, counted_cpu, folder_busy, folder_lock, result_cpu
from ..train.batches import task_probabilities
from ..train.checkpoint import checkpoint_progress
from .multitask import MultitaskConfig, evaluate, run, save_config, select_tasks

MATCHED = "@"
"""``lora@alora``: LoRA at the smallest rank with at least alora's trainable parameters."""


def cell_config(
    base: MultitaskConfig,
    method: str,
    seed: int,
    out: Path,
    tasks: list[str] | None = None,
    rank: int | None = None,
) -> MultitaskConfig:
    """The base config with this method (``m@other``: method m; ``rank`` then gives its rank), this
    seed (adapter init, batch order) and its own folder."""
    method = method.partition(MATCHED)[0]
    adapter = replace(base.adapter, method=method, seed=seed, model_type=None, base_model_name_or_path=None)
    if rank is not None:
        adapter = replace(adapter, r=rank)
    if method == "lora":
        adapter = replace(adapter, num_experts=1, router=None)
    elif adapter.router is None:
        adapter = replace(adapter, router="softmax", num_experts=max(base.adapter.num_experts, 2))
    data = base.data if tasks is None else replace(base.data, tasks=tasks)
    return replace(
        base, adapter=adapter, data=data, train=replace(base.train, seed=seed), output_dir=str(out)
    )


def run_cell(cfg: Any, log=print, save: Callable = save_config, runner: Callable = run) -> dict[str, Any]:
    """The cell's results: read when finished, else run (resuming from its checkpoint). ``save``
    writes the config the way the cell's recipe does; ``runner`` is that recipe's ``run``."""
    folder = Path(cfg.output_dir)
    with folder_lock(folder, log):
        check_same_config(cfg, save)
        done = folder / "results.json"
        if done.exists():
            log(f"skip (finished): {folder}")
        else:
            log(f"=== {folder}")
            runner(cfg, resume=True, log=log)
        return json.loads(done.read_text())


def run_grid(
    methods: Sequence[str],
    seeds: Sequence[int],
    cell: Callable[[str, int], Any],
    run_one: Callable[[Any], dict[str, Any]],
    log=print,
    wait: bool = True,
) -> dict[str, list[dict[str, Any]]] | None:
    """method -> its cells' results, one per seed: ``run_one(cell(method, seed))`` for every
    cell, cells that another process is running left until the others are done (then waited
    for), so several workers started on one grid share its cells instead of queueing behind
    each other. Without ``wait`` those cells are left to that process and None is returned
    when there were any (the grid is not finished yet)."""
    configs = {(m, s): cell(m, s) for m in methods for s in seeds}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    busy = []
    for key, cfg in configs.items():
        if folder_busy(Path(cfg.output_dir)):
            log(f"{'later' if wait else 'left'} (another process is running it): {cfg.output_dir}")
            busy.append(key)
        else:
            results[key] = run_one(cfg)
    if busy and not wait:
        return None
    for key in busy:
        results[key] = run_one(configs[key])
    return {m: [results[m, s] for s in seeds] for m in methods}


def cell_folder(out: Path, name: str, seed: int) -> Path:
    """Where a grid in ``out`` keeps its (``name``, ``seed``) cell: ``<name>/seed-<seed>``, a
    method's ``:`` written ``-`` (``peft-lily``), since Windows allows no colon in a path."""
    return out / name.replace(":", "-") / f"seed-{seed}"


def status_cells(
    out: Path, names: Sequence[str], seeds: Sequence[int], total: int, under: str = ""
) -> list[tuple[str, Path, int]]:
    """``grid_status``'s (label, folder, total) for every (name, seed) cell of the grid in ``out``
    (``under``: a subfolder holding such cells, e.g. the single-task ones), labelled by the
    cell's folder below ``out``."""
    folders = [cell_folder(out / under, n, s) for n in names for s in seeds]
    return [(f.relative_to(out).as_posix(), f, total) for f in folders]


Progress = Callable[[Path], tuple[int, float | None] | None]
"""A checkpoint folder -> (steps or rounds done, CPU seconds so far), None without a checkpoint."""
STATES = ("finished", "running", "resumable", "not started")


def grid_status(
    cells: Sequence[tuple[str, Path, int]], progress: Progress, unit: str, log=print
) -> dict[str, int]:
    """Where each (label, folder, total steps or rounds) cell of a grid stands, one line each:
    finished (with its CPU time), running in another process, resumable from a checkpoint (and
    how far it is), or not started; then the counts. Reads the folders only."""
    counts = dict.fromkeys(STATES, 0)
    width = max(len(label) for label, _, _ in cells)
    for label, folder, total in cells:
        state, detail = _cell_state(folder, progress, total, unit)
        counts[state] += 1
        log(f"  {label:<{width}}  {state}{detail}")
    log(", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {len(cells)} cells)")
    return counts


def _cell_state(folder: Path, progress: Progress, total: int, unit: str) -> tuple[str, str]:
    done = folder / "results.json"
    if done.exists():
        try:
            result = json.loads(done.read_text())
        except (OSError, ValueError):
            result = None
        return "finished", _hours(result_cpu(result))
    at = progress(folder / "checkpoint")
    state = "running" if folder_busy(folder) else "resumable" if at else "not started"
    if at is None:
        return state, ""
    return state, f" (checkpoint at {unit} {at[0]} of {total}{_hours(at[1], ' so far')})"


def _hours(cpu_seconds: float | None, suffix: str = "") -> str:
    return "" if cpu_seconds is None else f", {cpu_seconds / 3600:.2f} CPU-hours{suffix}"


LEFT_TO_OTHERS = (
    "cells another process is running were left to it (--leave-busy): no table yet; the call that "
    "finds every cell finished writes it (run this command again once they are)"
)


def check_grid(
    methods: list[str],
    seeds: list[int],
    known: Sequence[str],
    matched: Sequence[str] = (),
    refused: Mapping[str, str] | None = None,
) -> None:
    """Refuse an unknown method (also ``m@other``, where both are of ``matched``), a ``refused``
    one (with its reason) or an empty seed list, naming the flag."""
    for method in methods:
        if method in (refused or {}):
            raise ConfigError(f"--methods: {method} {refused[method]}")
    parts = [p for m in methods for p in (m.split(MATCHED, 1) if matched else [m])]
    unknown = [p for p in parts if p not in known]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    unmatched = [m for m in methods if MATCHED in m and not set(m.split(MATCHED, 1)) <= set(matched)]
    if unmatched:
        raise ConfigError(
            f"--methods: {', '.join(unmatched)}: m@other sizes one of {', '.join(matched)} to another"
        )
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")


def resolve_against(
    methods: Sequence[str], against: Sequence[str] | None, default: str, among: str = "--methods"
) -> list[str]:
    """The methods every other is paired against, the first one in the headline: ``against`` as
    given (each must be one of ``methods``, which the user gave as ``among``), or else ``default``
    when it is compared, else the first method."""
    if against:
        missing = [a for a in against if a not in methods]
        if missing:
            raise ConfigError(
                f"--against: {', '.join(missing)} is not among {among} ({', '.join(methods)}); "
                f"add it to {among} or leave it out"
            )
        return list(dict.fromkeys(against))
    return [default if default in methods else methods[0]]


def compare(
    base: MultitaskConfig,
    methods: list[str],
    seeds: list[int],
    out: str | Path,
    single_task_baseline: str | None = None,
    against: Sequence[str] | None = None,
    log=print,
    wait: bool = True,
    status: bool = False,
) -> dict[str, Any] | None:
    """Every (method, seed) cell of ``base``'s budget, then the table. ``single_task_baseline``
    (``same`` or ``share``, see ``SINGLE_TASK_BUDGETS``) also trains one LoRA per task for delta-m;
    ``against``: the methods every other is paired against (default lora). Without ``wait``,
    cells another process is running are left to it, and then no table is made (None).
    ``status``: only say where each cell stands (``grid_status``), running nothing."""
    check_grid(methods, seeds, METHODS, matched=OWN_METHODS, refused=REFUSED_METHODS)
    check_single_task_budget(single_task_baseline)
    against = resolve_against(methods, against, "lora")
    out = Path(out)
    tasks = select_tasks(base.data)
    if status:
        log(f"grid {out}:")
        cells = status_cells(out, methods, seeds, base.train.steps)
        if single_task_baseline:
            under = single_task_folder(out, single_task_baseline).name
            for task, train in zip(tasks, single_task_train(base, tasks, single_task_baseline), strict=True):
                cells += status_cells(out, [task.name], seeds, train.steps, under)
        grid_status(cells, checkpoint_progress, "step", log)
        return None
    ranks = matched_ranks(base, methods, log)
    task_names = [t.name for t in tasks]
    specs = base.data.tasks or task_names  # how each task is named in a config (a name or a file)
    with progress_bar(total=len(methods) * len(seeds), desc="compare", unit="cell") as bar:
        cells = run_grid(
            methods,
            seeds,
            lambda m, s: cell_config(base, m, s, cell_folder(out, m, s), rank=ranks.get(m)),
            lambda cfg: _counted(bar, run_cell(cfg, log)),
            log,
            wait,
        )
    references = (
        single_task_references(base, tasks, specs, seeds, out, single_task_baseline, log, wait)
        if single_task_baseline
        else None
    )
    if cells is None or (single_task_baseline and references is None):
        log(LEFT_TO_OTHERS)
        return None
    cells = {m: [{**r, "seed": s} for r, s in zip(rs, seeds, strict=True)] for m, rs in cells.items()}
    rows = {
        BASE_ROW: base_model_result(base, tasks, out / "base", log),
        MAJORITY_ROW: majority_answers(base, tasks),
    }
    summary = summarize_cells(cells, task_names, references, rows, against)
    for method, results in cells.items():
        summary["methods"][method]["train_cpu_seconds_per_step"] = _step_seconds(results, base.train.steps)
    summary.update(seeds=seeds, model=base.model, steps=base.train.steps, batch_size=base.train.batch_size)
    summary["single_task_budget"] = single_task_baseline
    summary["matched_ranks"] = ranks
    summary["anchor_settings"] = {
        m: anchor_settings(cell_folder(out, m, seeds[0]) / "adapter") for m in methods if is_anchor(m)
    }
    return write_summary(summary, out, lambda s: to_markdown(s, tail=STEP_TIME), log)


def matched_ranks(base: MultitaskConfig, methods: list[str], log=print) -> dict[str, int]:
    """For each ``m@other`` method: the smallest rank at which m has at least other's trainable
    parameters on the config's model (read from the model's module shapes)."""
    specs = [m for m in methods if MATCHED in m]
    if not specs:
        return {}
    model, _ = load_model(base.model, dtype=base.dtype)
    ranks = {}
    for spec in specs:
        method, other = spec.split(MATCHED, 1)
        mine, theirs = (cell_config(base, m, 0, Path()).adapter for m in (method, other))
        ranks[spec] = matching_rank(model, mine, theirs)
        size, goal = planned_size(model, replace(mine, r=ranks[spec])), planned_size(model, theirs)
        log(f"{spec}: {method} at r={ranks[spec]}: {size:,} trainable parameters, {other} {goal:,}")
    return ranks


def _counted(bar, result: dict[str, Any]) -> dict[str, Any]:
    """``result``, after advancing the overall progress bar by one cell."""
    bar.update(1)
    return result


BASE_ROW, MAJORITY_ROW = "base model", "majority answer"


def base_model_result(cfg: MultitaskConfig, tasks: list[Task], folder: Path, log=print) -> dict[str, Any]:
    """The base model (no adapter) scored on the cells' test questions; kept in ``folder`` and
    reused while the model, its dtype, the data and the evaluation settings stay the same. Loaded
    as the cells load it (dtype, device), so the base row is scored the way the adapters are."""
    key = {"model": cfg.model, "dtype": cfg.dtype, "data": to_dict(cfg.data), "eval": to_dict(cfg.eval),
           "questions": {t.name: scored_questions_digest(t, cfg.data.split_seed, cfg.eval.limit) for t in tasks}}  # fmt: skip

    def score() -> dict[str, Any]:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
        model.to(resolve_device(cfg.device))
        return evaluate(model, tokenizer, tasks, cfg, log=log).to_dict()

    return stored_result(folder, key, score, "the base model, no adapter", log)


def scored_questions_digest(task: Task, split_seed: int, limit: int | None) -> str:
    """The digest of the test questions an evaluation scores (no model needed), for the keys of
    stored base rows: a base row is scored again when a task's data changes under the same name."""
    return scored_questions(task, test_examples(task, seed=split_seed, limit=limit))


def stored_result(
    folder: Path, key: dict[str, Any], make: Callable[[], dict[str, Any]], what: str, log=print
) -> dict[str, Any]:
    """``make()``, kept in ``folder`` (results.json, and settings.json = ``key``, the settings it
    depends on) and read back instead of made again while ``key`` stays the same."""
    with folder_lock(folder, log):
        done, saved_key = folder / "results.json", folder / "settings.json"
        if done.exists() and saved_key.exists() and json.loads(saved_key.read_text()) == key:
            log(f"skip (finished): {folder}")
            return json.loads(done.read_text())
        log(f"=== {folder}: {what}")
        result = make()
        folder.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        saved_key.write_text(json.dumps(key, indent=2) + "\n")
        return result


def majority_answers(cfg: MultitaskConfig, tasks: list[Task]) -> dict[str, Any]:
    """Every task's most frequent training answer, scored on the same test questions."""
    return majority_report(tasks, seed=cfg.data.split_seed, limit=cfg.eval.limit).to_dict()


def write_summary(summary: dict[str, Any], out: Path, markdown: Callable, log=print) -> dict[str, Any]:
    """results.json, results.md (``markdown(summary)``) and results.png in ``out``; prints the table.
    Written under ``out``'s lock: workers that share a grid finish it together."""
    table = markdown(summary)
    with folder_lock(out, log):
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "results.md").write_text(table + "\n")
        plot(summary, out / "results.png")
    log(table)
    log(f"table: {out / 'results.md'}\nplot:  {out / 'results.png'}\njson:  {out / 'results.json'}")
    return summary


SINGLE_TASK_BUDGETS = {
    "same": "each task's LoRA trains for train.steps, as the multi-task run",
    "share": "each task's LoRA trains for its share of the multi-task mix's steps (the examples it gets there)",
}


def check_single_task_budget(budget: str | None) -> None:
    if budget is not None and budget not in SINGLE_TASK_BUDGETS:
        raise ConfigError(
            f"--single-task-baseline {budget!r}: choose {' or '.join(SINGLE_TASK_BUDGETS)} "
            f"({'; '.join(f'{k}: {v}' for k, v in SINGLE_TASK_BUDGETS.items())})"
        )


def single_task_train(base: MultitaskConfig, tasks: list[Task], budget: str) -> list[Any]:
    """Each task's training settings for its single-task LoRA: ``base.train`` (``same``), or its
    steps and warm-up cut to the task's mixing probability (``share``; at least one step, and at
    least one warm-up step when the multi-task run warms up)."""
    if budget == "same":
        return [base.train] * len(tasks)
    examples = training_examples(tasks, base.data.split_seed, base.data.max_train_per_task)
    probs = task_probabilities([len(e) for e in examples], base.train.mixing_temperature)
    shares = [max(1, round(base.train.steps * p)) for p in probs]
    warmup = base.train.warmup_steps
    return [
        replace(base.train, steps=n, warmup_steps=max(min(warmup, 1), round(warmup * n / base.train.steps)))
        for n in shares
    ]


def single_task_folder(out: Path, budget: str) -> Path:
    return out / ("single-task" if budget == "same" else f"single-task-{budget}")


def single_task_references(
    base: MultitaskConfig,
    tasks: list[Task],
    specs: list[str],
    seeds: list[int],
    out: Path,
    budget: str = "same",
    log=print,
    wait: bool = True,
) -> dict[str, float] | None:
    """Each task's score under a LoRA trained on that task alone (budget: see
    ``SINGLE_TASK_BUDGETS``), mean over seeds (None: cells left to another process, see
    ``run_grid``)."""
    folder = single_task_folder(out, budget)
    alone = {
        task.name: (replace(base, train=train_cfg), spec)
        for task, spec, train_cfg in zip(tasks, specs, single_task_train(base, tasks, budget), strict=True)
    }

    def cell(name: str, seed: int) -> MultitaskConfig:
        one, spec = alone[name]
        return cell_config(one, "lora", seed, cell_folder(folder, name, seed), [spec])

    runs = run_grid(list(alone), seeds, cell, lambda cfg: run_cell(cfg, log), log, wait)
    if runs is None:
        return None
    return {name: statistics.fmean(r["tasks"][0]["score"] for r in results) for name, results in runs.items()}


def _scores(result: dict[str, Any]) -> dict[str, float]:
    return {t["task"]: t["score"] for t in result["tasks"]}


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarize_cells(
    cells: dict[str, list[dict]],
    tasks: list[str],
    references: dict[str, float] | None,
    rows: dict[str, dict] | None,
    against: Sequence[str],
) -> dict[str, Any]:
    """Per method: each task's mean and sd over seeds; the per-seed average, worst task, std across
    tasks and delta-m, each as mean and sd over seeds. Where the cells hold per-question predictions:
    95 % intervals (bootstrap over questions, seeds pooled), the paired difference of every method
    against each method of ``against`` and against each reference row (``rows``: base model, majority answer),
    and the share of each task's most frequent answer."""
    methods = {}
    for method, results in cells.items():
        per_seed = [r["summary"] for r in results]
        scores = [_scores(r) for r in results]
        entry = {
            "trainable_parameters": results[0].get("trainable_parameters"),
            "tasks": {t: mean_sd([s[t] for s in scores]) for t in tasks},
            "average": mean_sd([p["average"] for p in per_seed]),
            "worst": mean_sd([p["worst"] for p in per_seed]),
            "std_across_tasks": mean_sd([p["std"] for p in per_seed]),
            "cpu_minutes": _cpu_minutes(results),
        }
        if references:
            entry["delta_m"] = _delta_m_over_seeds(scores, references)
        methods[method] = entry
    summary = {"tasks": tasks, "methods": methods, "single_task_reference": references}
    if rows is not None and all("predictions" in t for rs in cells.values() for r in rs for t in r["tasks"]):
        summary.update(intervals(cells, tasks, rows, against))
    return summary


def _cpu_minutes(results: list[dict]) -> dict[str, float] | None:
    """A cell's CPU time in minutes (all its parts), mean and sd over seeds; None unless every
    seed's run counted all of it."""
    totals = []
    for result in results:
        total = result_cpu(result)
        if total is None:
            return None
        totals.append(total / 60)
    return mean_sd(totals)


def _step_seconds(results: list[dict], steps: int) -> dict[str, float] | None:
    """The training loop's CPU seconds per optimizer step (its checkpoints and any evaluations
    during training included), mean and sd over seeds; None unless every seed counted it."""
    spent = [counted_cpu((r.get("cpu_seconds") or {}).get("train")) for r in results]
    return None if None in spent else mean_sd([s / steps for s in spent])


def _check_same_questions(runs: dict[str, list[dict]], tasks: list[str]) -> None:
    """Every run and seed of a table must have been scored on the same questions of each task."""
    for name in tasks:
        check_same_questions({
            _label(run, result, i, len(results)): entry
            for run, results in runs.items()
            for i, result in enumerate(results)
            for entry in result["tasks"]
            if entry["task"] == name
        })  # fmt: skip


def _label(run: str, result: dict, index: int, count: int) -> str:
    """``lora, seed 2`` (a cell), ``base model`` (a reference row)."""
    if result.get("seed") is not None:
        return f"{run}, seed {result['seed']}"
    return run if count == 1 else f"{run}, run {index + 1}"


def _per_question(results: list[dict], tasks: list[str]) -> dict[str, np.ndarray]:
    """task -> per-question scores, (seeds, questions)."""
    by_task = [{t["task"]: t for t in r["tasks"]} for r in results]
    return {name: np.array([question_scores(r[name]) for r in by_task]) for name in tasks}


def _answer_shares(results: list[dict], tasks: list[str]) -> dict[str, float]:
    """task -> share of the most frequent answer (%), mean over seeds."""
    by_task = [{t["task"]: t for t in r["tasks"]} for r in results]
    return {name: statistics.fmean(most_frequent_answer_share(r[name]) for r in by_task) for name in tasks}


def intervals(
    cells: dict[str, list[dict]], tasks: list[str], rows: dict[str, dict], against: Sequence[str]
) -> dict:
    """The statistics part of a summary (see ``summarize_cells``): one entry per reference row and
    per method; ``reference`` is the first of ``against``, ``also_against`` the others."""
    runs = {**{name: [result] for name, result in rows.items()}, **cells}
    _check_same_questions(runs, tasks)
    table = Table(tasks, {name: _per_question(results, tasks) for name, results in runs.items()})
    ci = table.intervals()
    differences = {ref: table.differences(ref) for ref in [*against, *rows]}
    entries = {
        name: {
            "intervals": {key: iv.as_dict() for key, iv in ci[name].items()},
            "top_answer_share": _answer_shares(results, tasks),
            "differences": {
                ref: {key: iv.as_difference() for key, iv in diffs[name].items()}
                for ref, diffs in differences.items()
                if name in diffs
            },
        }
        for name, results in runs.items()
    }
    return {
        "reference": against[0],
        "also_against": list(against[1:]),
        "reference_rows": {name: entries[name] for name in rows},
        "interval_level": 0.95,
        "method_statistics": {name: entries[name] for name in cells},
    }


def _delta_m_over_seeds(
    scores: list[dict[str, float]], references: dict[str, float]
) -> dict[str, float] | None:
    """delta-m % per seed (mean and sd), or None where a zero reference score leaves it undefined."""
    try:
        return mean_sd([delta_m(s, references) for s in scores])
    except ValueError:
        return None


Columns = tuple[list[str], Callable[[dict[str, Any]], list[str]]]
"""Extra table columns: their headers, and a method's summary entry -> their cells."""


def _parameters(m: dict[str, Any]) -> list[str]:
    return [f"{m['trainable_parameters']:,}" if m["trainable_parameters"] else "-"]


def _step_time(m: dict[str, Any]) -> list[str]:
    v = m.get("train_cpu_seconds_per_step")
    return [("-" if v is None else f"{v['mean']:.3g}" if v["n"] < 2 else f"{v['mean']:.3g} ± {v['sd']:.2g}")]


PARAMETERS: Columns = (["params"], _parameters)
STEP_TIME: Columns = (["train CPU s/step"], _step_time)
NO_COLUMNS: Columns = ([], lambda m: [])


def parameters_note(summary: dict[str, Any]) -> str:
    """Which rows, if any, are parameter-matched, and at which rank."""
    matched = [
        f"{spec} is {spec.split(MATCHED)[0]} at r={rank}, the smallest rank with at least "
        f"{spec.split(MATCHED)[1]}'s trainable parameters"
        for spec, rank in (summary.get("matched_ranks") or {}).items()
    ]
    anchors = [
        f"{name} is PEFT's own method, run by PEFT with {', '.join(f'{k}={v}' for k, v in settings.items())} "
        "(r: the smallest with at least alora's trainable parameters; docs/peft-anchors.md)"
        for name, settings in (summary.get("anchor_settings") or {}).items()
    ]
    notes = matched + anchors
    return "; ".join(notes) + "." if notes else "Trainable parameters are not matched across methods."


def to_markdown(
    summary: dict[str, Any], lead: Columns = PARAMETERS, tail: Columns = NO_COLUMNS, note: str | None = None
) -> str:
    """The comparison as Markdown: the headline, the scores with intervals (reference rows first;
    ``lead`` columns after the name, ``tail`` columns at the end), the paired differences and the
    answer shares; mean ± sd over seeds where the cells hold no per-question predictions."""
    tasks, methods = summary["tasks"], summary["methods"]
    if "method_statistics" not in summary:
        return _seed_table(summary)
    stats, rows = summary["method_statistics"], summary["reference_rows"]
    has_dm = summary.get("single_task_reference") is not None
    dm = ["delta-m %"] if has_dm else []
    head = ["model", *lead[0], *tasks, "average", "worst", "std", *dm, *tail[0]]
    lines = [
        headline(summary),
        "",
        f"Scores (%) with 95 % intervals (bootstrap over test questions, seeds {summary.get('seeds')} pooled):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, entry in rows.items():
        cells = [f"*{name}*"] + ["-"] * len(lead[0])
        cells += [interval_text(entry["intervals"][t]) for t in [*tasks, "average"]]
        cells += [""] * (2 + len(dm) + len(tail[0]))
        lines.append("| " + " | ".join(cells) + " |")
    for name, m in methods.items():
        cells = [name, *lead[1](m)]
        cells += [interval_text(stats[name]["intervals"][t]) for t in [*tasks, "average"]]
        cells += [plus_minus(m["worst"]), plus_minus(m["std_across_tasks"])]
        if has_dm:
            cells.append(
                plus_minus(m["delta_m"], signed=True) if m["delta_m"] else "undefined (a reference is 0)"
            )
        cells += tail[1](m)
        lines.append("| " + " | ".join(cells) + " |")
    for reference in [summary["reference"], *summary.get("also_against", [])]:
        lines += ["", _difference_table(summary, reference)]
    lines += ["", _against_rows_table(summary)]
    lines += ["", _share_table(summary)]
    lines += [
        "",
        "Worst and std (across tasks) are mean ± sd over seeds. Differences are paired (same questions, "
        f"same bootstrap draws); * marks an interval that excludes 0. {note or parameters_note(summary)}",
    ]
    return "\n".join([*lines, *footer(summary)])


def footer(summary: dict[str, Any]) -> list[str]:
    """The lines under a table: what delta-m is measured against, and what each cell cost."""
    budget = summary.get("single_task_budget")
    lines = ["", f"delta-m % is against single-task LoRAs: {SINGLE_TASK_BUDGETS[budget]}."] if budget else []
    return lines + cpu_note(summary["methods"])


def cpu_note(methods: dict[str, Any]) -> list[str]:
    """The lines saying what each cell cost in CPU time (none when no cell counted it)."""
    spent = {name: m.get("cpu_minutes") for name, m in methods.items()}
    if not any(spent.values()):
        return []
    parts = [f"{name} {plus_minus(c)} min" if c else f"{name} not counted" for name, c in spent.items()]
    return [
        "",
        f"CPU time per cell (training and evaluation, one process; mean ± sd over seeds): {', '.join(parts)}.",
    ]


def headline(summary: dict[str, Any]) -> str:
    """What the comparison shows, in one line: the reference method's average against the base
    model and the majority answer, and every other method's against the reference, each with its
    interval and whether it excludes 0."""
    stats, reference = summary["method_statistics"], summary["reference"]

    def said(diff: dict[str, Any]) -> str:
        verdict = "measurable" if diff["excludes_zero"] else "within noise"
        return f"{interval_text(diff, signed=True)} ({verdict})"

    ref = stats[reference]["differences"]
    parts = [
        f"{reference} - {row}: {said(ref[row]['average'])}" for row in summary["reference_rows"] if row in ref
    ]
    parts += [
        f"{name} - {reference}: {said(entry['differences'][reference]['average'])}"
        for name, entry in stats.items()
        if name != reference
    ]
    return "In one line (average over tasks, points): " + "; ".join(parts) + "."


def _difference_table(summary: dict[str, Any], reference: str) -> str:
    tasks = summary["tasks"]
    lines = [
        f"Paired difference against {reference} (points):",
        "",
        "| method | " + " | ".join([*tasks, "average"]) + " |",
        "|" + "---|" * (len(tasks) + 2),
    ]
    for name, entry in summary["method_statistics"].items():
        diffs = entry["differences"].get(reference)
        if diffs:
            cells = [interval_text(diffs[t], signed=True, mark=True) for t in [*tasks, "average"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _against_rows_table(summary: dict[str, Any]) -> str:
    rows = list(summary["reference_rows"])
    lines = [
        "Average against the reference rows (points, paired):",
        "",
        "| method | " + " | ".join(f"vs {r}" for r in rows) + " |",
        "|" + "---|" * (len(rows) + 1),
    ]
    for name, entry in summary["method_statistics"].items():
        cells = [interval_text(entry["differences"][r]["average"], signed=True, mark=True) for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _share_table(summary: dict[str, Any]) -> str:
    tasks = summary["tasks"]
    lines = [
        "Share of the most frequent answer (or picked position, if higher) per task (%; 100 = one answer for "
        "every question):",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    entries = {**summary["reference_rows"], **summary["method_statistics"]}
    for name, entry in entries.items():
        lines.append(f"| {name} | " + " | ".join(f"{entry['top_answer_share'][t]:.0f}" for t in tasks) + " |")
    return "\n".join(lines)


def _seed_table(summary: dict[str, Any]) -> str:
    """Mean ± sd over seeds, for cells without per-question predictions."""
    tasks, methods = summary["tasks"], summary["methods"]
    has_dm = summary.get("single_task_reference") is not None
    head = ["method", "params", *tasks, "average", "worst", "std"] + (["delta-m %"] if has_dm else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [name, f"{m['trainable_parameters']:,}" if m["trainable_parameters"] else "-"]
        cells += [plus_minus(m["tasks"][t]) for t in tasks]
        cells += [plus_minus(m["average"]), plus_minus(m["worst"]), plus_minus(m["std_across_tasks"])]
        if has_dm:
            cells.append(
                plus_minus(m["delta_m"], signed=True) if m["delta_m"] else "undefined (a reference is 0)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    seeds = summary.get("seeds")
    lines.append("")
    lines.append(f"Scores in %, mean ± sd over seeds {seeds}. {parameters_note(summary)}")
    return "\n".join([*lines, *footer(summary)])


def plus_minus(v: dict[str, float], signed: bool = False) -> str:
    """mean ± sd over seeds (just the mean when there is one seed: no spread was measured)."""
    mean = f"{v['mean']:+.1f}" if signed else f"{v['mean']:.1f}"
    return mean if v.get("n", 2) < 2 else f"{mean} ± {v['sd']:.1f}"


def _bars(summary: dict[str, Any]) -> dict[str, tuple[list[float], list[list[float]] | None]]:
    """label -> (heights, error bars below/above or None) over the groups (tasks, then average).
    Intervals where the summary has them; sd over seeds where there are several; else no bars."""
    groups = [*summary["tasks"], "average"]
    bars = {}
    if "method_statistics" in summary:
        for name, entry in {**summary["reference_rows"], **summary["method_statistics"]}.items():
            ivs = [entry["intervals"][g] for g in groups]
            heights = [iv["value"] for iv in ivs]
            nothing = [iv["high"] == iv["low"] for iv in ivs]  # a constant score: no bar, not a flat one
            below = [math.nan if n else iv["value"] - iv["low"] for iv, n in zip(ivs, nothing, strict=True)]
            above = [math.nan if n else iv["high"] - iv["value"] for iv, n in zip(ivs, nothing, strict=True)]
            bars[name] = (heights, [below, above])
        return bars
    for name, m in summary["methods"].items():
        stats = [m["tasks"][t] for t in summary["tasks"]] + [m["average"]]
        spread = all(s.get("n", 2) > 1 for s in stats)
        bars[name] = ([s["mean"] for s in stats], [[s["sd"] for s in stats]] * 2 if spread else None)
    return bars


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Grouped bars: one group per task (and the average), one bar per model (the reference rows
    first), with 95 % intervals, or the sd over seeds where no interval was computed; a bar
    measured once with nothing to show gets no error bar rather than a zero-height one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*summary["tasks"], "average"]
    bars = _bars(summary)
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4.2))
    for i, (name, (heights, errors)) in enumerate(bars.items()):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        hatch = "//" if name in summary.get("reference_rows", {}) else None
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=name, hatch=hatch)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    what = "95 % intervals" if "method_statistics" in summary else "mean ± sd over seeds"
    ax.set_title(
        f"{summary.get('model', '')}: per-task score, {what}, seeds {summary.get('seeds')}", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
