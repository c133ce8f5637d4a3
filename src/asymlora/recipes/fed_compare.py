"""Compare federated methods under one budget: every (method, seed) cell is an ``asymlora federate``
run in its own folder (finished cells are skipped on a re-run), then one table, one JSON and one
bar chart of each client's personalised score, with each method's communication per client per round.

    OUT/<method>/seed-<s>/        a full federate run folder per cell
    OUT/results.json, OUT/results.md, OUT/results.png
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from statistics import fmean
from typing import Any

from ..eval.report import summarize
from ..federated import METHODS
from . import compare
from .compare import plus_minus, summarize_cells
from .federated import FederatedConfig, run, save_config


def cell_config(base: FederatedConfig, method: str, seed: int, out: Path) -> FederatedConfig:
    """The base config with this method, this seed (initial draws, participants, batches) and its
    own folder."""
    federation = replace(base.federation, method=method)
    return replace(base, federation=federation, seed=seed, output_dir=str(out))


def run_cell(cfg: FederatedConfig, log=print) -> dict[str, Any]:
    return compare.run_cell(cfg, log, save=save_config, runner=run)


def as_task_cell(result: dict[str, Any]) -> dict[str, Any]:
    """A federate result in the shape ``compare.summarize_cells`` reads: clients as tasks."""
    scores = result["scores"]
    return {
        "tasks": [{"task": name, "score": score} for name, score in scores.items()],
        "summary": summarize(scores),
        "trainable_parameters": None,
    }


def fed_compare(
    base: FederatedConfig, methods: list[str], seeds: list[int], out: str | Path, log=print
) -> dict[str, Any]:
    compare.check_grid(methods, seeds, METHODS)
    out = Path(out)
    results = {
        m: [run_cell(cell_config(base, m, s, out / m / f"seed-{s}"), log) for s in seeds] for m in methods
    }
    clients = list(results[methods[0]][0]["scores"])
    summary = summarize_cells({m: [as_task_cell(r) for r in rs] for m, rs in results.items()}, clients, None)
    for method, runs in results.items():
        entry = summary["methods"][method]
        entry["ranks"] = runs[0]["ranks"]
        entry["mb_up_per_client_round"] = fmean(r["bytes_up_per_client_round"] for r in runs) / 1e6
        entry["mb_down_per_client_round"] = fmean(r["bytes_down_per_client_round"] for r in runs) / 1e6
    summary.update(
        seeds=seeds,
        model=base.model,
        rounds=base.federation.rounds,
        local_steps=base.train.steps,
        batch_size=base.train.batch_size,
    )
    return compare.write_summary(summary, out, to_markdown, log)


def to_markdown(summary: dict[str, Any]) -> str:
    clients, methods = summary["tasks"], summary["methods"]
    head = ["method", "ranks", *clients, "average", "worst", "std", "MB up + down / client / round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        ranks = sorted(set(m["ranks"]), reverse=True)
        cells = [name, ",".join(map(str, ranks))]
        cells += [plus_minus(m["tasks"][c]) for c in clients]
        cells += [plus_minus(m["average"]), plus_minus(m["worst"]), plus_minus(m["std_across_tasks"])]
        up, down = m["mb_up_per_client_round"], m["mb_down_per_client_round"]
        cells.append(f"{up:.3f} + {down:.3f} = {up + down:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Personalised scores (each client's own model on its own task) in %, mean ± sd over seeds "
        f"{summary.get('seeds')}; {summary.get('rounds')} rounds x {summary.get('local_steps')} local "
        f"steps of {summary.get('batch_size')} examples. Communication: the bytes the simulator "
        "transferred, averaged over clients and rounds.",
    ]
    return "\n".join(lines)
