"""Compare methods under one budget: every (method, seed) cell is a multitask run in its own
folder (finished cells are skipped on a re-run), then one table, one JSON and one bar chart.

    OUT/<method>/seed-<s>/        a full multitask run folder per cell
    OUT/single-task/<task>/seed-<s>/   single-task LoRA baselines (with --single-task-baseline)
    OUT/results.json, OUT/results.md, OUT/results.png
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..adapters import METHODS
from ..config import ConfigError
from ..eval.report import delta_m
from ..runfolder import check_same_config, folder_lock
from .multitask import MultitaskConfig, run, save_config, select_tasks


def cell_config(
    base: MultitaskConfig, method: str, seed: int, out: Path, tasks: list[str] | None = None
) -> MultitaskConfig:
    """The base config with this method, this seed (adapter init, batch order) and its own folder."""
    adapter = replace(base.adapter, method=method, seed=seed, model_type=None, base_model_name_or_path=None)
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


def check_grid(methods: list[str], seeds: list[int], known: Sequence[str]) -> None:
    """Refuse an unknown method or an empty seed list, naming the flag."""
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")


def compare(
    base: MultitaskConfig,
    methods: list[str],
    seeds: list[int],
    out: str | Path,
    single_task_baseline: bool = False,
    log=print,
) -> dict[str, Any]:
    check_grid(methods, seeds, METHODS)
    out = Path(out)
    tasks = select_tasks(base.data)
    task_names = [t.name for t in tasks]
    specs = base.data.tasks or task_names  # how each task is named in a config (a name or a file)
    cells = {
        m: [run_cell(cell_config(base, m, s, out / m / f"seed-{s}"), log) for s in seeds] for m in methods
    }
    references = (
        single_task_references(base, task_names, specs, seeds, out, log) if single_task_baseline else None
    )
    summary = summarize_cells(cells, task_names, references)
    summary.update(seeds=seeds, model=base.model, steps=base.train.steps, batch_size=base.train.batch_size)
    return write_summary(summary, out, to_markdown, log)


def write_summary(summary: dict[str, Any], out: Path, markdown: Callable, log=print) -> dict[str, Any]:
    """results.json, results.md (``markdown(summary)``) and results.png in ``out``; prints the table."""
    table = markdown(summary)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    plot(summary, out / "results.png")
    log(table)
    log(f"table: {out / 'results.md'}\nplot:  {out / 'results.png'}\njson:  {out / 'results.json'}")
    return summary


def single_task_references(
    base: MultitaskConfig, names: list[str], specs: list[str], seeds: list[int], out: Path, log=print
) -> dict[str, float]:
    """Each task's score under a LoRA trained on that task alone (same budget), mean over seeds."""
    references = {}
    for name, spec in zip(names, specs, strict=True):
        runs = [
            run_cell(cell_config(base, "lora", s, out / "single-task" / name / f"seed-{s}", [spec]), log)
            for s in seeds
        ]
        references[name] = statistics.fmean(r["tasks"][0]["score"] for r in runs)  # its one task
    return references


def _scores(result: dict[str, Any]) -> dict[str, float]:
    return {t["task"]: t["score"] for t in result["tasks"]}


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarize_cells(
    cells: dict[str, list[dict]], tasks: list[str], references: dict[str, float] | None
) -> dict[str, Any]:
    """Per method: each task's mean and sd over seeds; the per-seed average, worst task, std across
    tasks and delta-m, each as mean and sd over seeds."""
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
        }
        if references:
            entry["delta_m"] = _delta_m_over_seeds(scores, references)
        methods[method] = entry
    return {"tasks": tasks, "methods": methods, "single_task_reference": references}


def _delta_m_over_seeds(
    scores: list[dict[str, float]], references: dict[str, float]
) -> dict[str, float] | None:
    """delta-m % per seed (mean and sd), or None where a zero reference score leaves it undefined."""
    try:
        return mean_sd([delta_m(s, references) for s in scores])
    except ValueError:
        return None


def to_markdown(summary: dict[str, Any]) -> str:
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
    lines.append(
        f"Scores in %, mean ± sd over seeds {seeds}. Trainable parameters are not matched across methods "
        "(the params column gives each method's count at the same rank)."
    )
    return "\n".join(lines)


def plus_minus(v: dict[str, float], signed: bool = False) -> str:
    """mean ± sd over seeds (just the mean when there is one seed: no spread was measured)."""
    mean = f"{v['mean']:+.1f}" if signed else f"{v['mean']:.1f}"
    return mean if v.get("n", 2) < 2 else f"{mean} ± {v['sd']:.1f}"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Grouped bars: one group per task (and the average), one bar per method, sd as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*summary["tasks"], "average"]
    methods = summary["methods"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
    for i, (name, m) in enumerate(methods.items()):
        stats = [m["tasks"][t] for t in summary["tasks"]] + [m["average"]]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [s["mean"] for s in stats], width, yerr=[s["sd"] for s in stats], capsize=3, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(f"{summary.get('model', '')}: per-task score, mean ± sd over seeds {summary.get('seeds')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
