"""Compare federated methods under one budget: every (method, seed) cell is an ``asymlora federate``
run in its own folder (finished cells are skipped on a re-run), then one table, one JSON and one
bar chart of each client's personalised score, with each method's communication per client per round.

    OUT/<method>/seed-<s>/        a full federate run folder per cell
    OUT/base/                     the base model (no adapter) on every client's test questions
    OUT/results.json, OUT/results.md, OUT/results.png

Where every client has one task (the task partition), the table gives 95 % intervals by bootstrap
over each client's test questions (seeds pooled), paired differences against the reference method
(the registry's ``BASELINE``, FedIT), and two reference rows: the base model and the majority answer. Clients
with a mix of tasks (the Dirichlet partition) get mean ± sd over seeds only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from statistics import fmean
from typing import Any

from ..config import to_dict
from ..engines.local import checkpoint_progress
from ..eval.report import TaskResult, summarize
from ..eval.runner import majority_result
from ..federated import BASELINE, METHODS
from ..models import load_model, resolve_device
from . import compare
from .compare import (
    BASE_ROW,
    MAJORITY_ROW,
    plus_minus,
    scored_questions_digest,
    stored_result,
    summarize_cells,
)
from .federated import ClientData, FederatedConfig, build_clients, run, save_config, task_result


def cell_config(base: FederatedConfig, method: str, seed: int, out: Path) -> FederatedConfig:
    """The base config with this method, this seed (initial draws, participants, batches) and its
    own folder."""
    federation = replace(base.federation, method=method)
    return replace(base, federation=federation, seed=seed, output_dir=str(out))


def run_cell(cfg: FederatedConfig, log=print) -> dict[str, Any]:
    return compare.run_cell(cfg, log, save=save_config, runner=run)


def as_task_cell(result: dict[str, Any]) -> dict[str, Any]:
    """A federate result in the shape ``compare.summarize_cells`` reads: clients as tasks, each with
    its per-question predictions where the client has one task (and the run kept them)."""
    scores = result["scores"]
    own = result.get("client_results") or {}
    tasks = []
    for name, score in scores.items():
        kept = own.get(name) or []
        tasks.append(
            {**kept[0], "task": name, "score": score} if len(kept) == 1 else {"task": name, "score": score}
        )
    return {
        "tasks": tasks,
        "summary": summarize(scores),
        "trainable_parameters": None,
        "cpu_seconds": result.get("cpu_seconds"),
        "seed": result.get("seed"),
    }


def as_clients(results: dict[str, TaskResult]) -> dict[str, Any]:
    """Per-client task results (one task per client) in a result's shape, clients named as tasks."""
    return {"tasks": [{**asdict(r), "task": name} for name, r in results.items()]}


def reference_rows(base: FederatedConfig, out: Path, log=print) -> dict[str, dict[str, Any]] | None:
    """The base model and the majority answer on every client's test questions (the base model's
    kept in ``out``/base and reused while its settings stay the same); None when a client has
    several tasks (its score is a mix, not a score per question)."""
    clients = build_clients(base.clients)
    if any(len(c.tasks) != 1 for c in clients):
        return None
    ev = base.eval
    key = {"model": base.model, "dtype": base.dtype, "clients": to_dict(base.clients),
           "eval": {"limit": ev.limit, "batch_size": ev.batch_size, "max_length": ev.max_length},
           "questions": {c.name: scored_questions_digest(c.tasks[0], base.clients.split_seed, ev.limit)
                         for c in clients}}  # fmt: skip

    def score() -> dict[str, Any]:
        model, tokenizer = load_model(base.model, dtype=base.dtype)
        model.to(resolve_device(base.device))
        return as_clients({c.name: task_result(model, tokenizer, c.tasks[0], base) for c in clients})

    return {
        BASE_ROW: stored_result(out / "base", key, score, "the base model, no adapter", log),
        MAJORITY_ROW: as_clients(_majority(clients, base)),
    }


def _majority(clients: list[ClientData], cfg: FederatedConfig) -> dict[str, TaskResult]:
    return {
        c.name: majority_result(c.tasks[0], seed=cfg.clients.split_seed, limit=cfg.eval.limit)
        for c in clients
    }


def fed_compare(
    base: FederatedConfig,
    methods: list[str],
    seeds: list[int],
    out: str | Path,
    against: Sequence[str] | None = None,
    log=print,
    wait: bool = True,
    status: bool = False,
) -> dict[str, Any] | None:
    """Every (method, seed) run of ``base``, then the table (None without ``wait`` when cells
    were left to another process, see ``compare.run_grid``). ``status``: only say where each
    cell stands, running nothing."""
    compare.check_grid(methods, seeds, METHODS)
    against = compare.resolve_against(methods, against, BASELINE)
    out = Path(out)
    if status:
        log(f"grid {out}:")
        cells = compare.status_cells(out, methods, seeds, base.federation.rounds)
        compare.grid_status(cells, checkpoint_progress, "round", log)
        return None
    results = compare.run_grid(
        methods,
        seeds,
        lambda m, s: cell_config(base, m, s, compare.cell_folder(out, m, s)),
        lambda c: run_cell(c, log),
        log,
        wait,
    )
    if results is None:
        log(compare.LEFT_TO_OTHERS)
        return None
    return summarize_runs(results, base, out, against, log)


def summarize_runs(
    results: dict[str, list[dict[str, Any]]],
    base: FederatedConfig,
    out: Path,
    against: Sequence[str],
    log=print,
) -> dict[str, Any]:
    """The comparison table, JSON and plot in ``out`` of finished federate runs (``results``: a
    label -> the runs' results.json, one per seed), with paired differences against the runs
    labelled by each of ``against`` and the base model and majority rows of ``base``'s clients."""
    seeds = [r["seed"] for r in next(iter(results.values()))]
    clients = list(next(iter(results.values()))[0]["scores"])
    cells = {m: [as_task_cell(r) for r in rs] for m, rs in results.items()}
    rows = reference_rows(base, out, log)
    summary = summarize_cells(cells, clients, None, rows, against)
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


def _ranks(m: dict[str, Any]) -> list[str]:
    return [",".join(map(str, sorted(set(m["ranks"]), reverse=True)))]


def _traffic(m: dict[str, Any]) -> list[str]:
    up, down = m["mb_up_per_client_round"], m["mb_down_per_client_round"]
    return [f"{up:.3f} + {down:.3f} = {up + down:.3f}"]


def _budget(summary: dict[str, Any]) -> str:
    return (
        f"Personalised scores (each client's own model on its own task); {summary.get('rounds')} rounds x "
        f"{summary.get('local_steps')} local steps of {summary.get('batch_size')} examples. Communication: "
        "the bytes the simulator transferred, averaged over clients and rounds."
    )


def to_markdown(summary: dict[str, Any]) -> str:
    if "method_statistics" in summary:
        return compare.to_markdown(
            summary,
            lead=(["ranks"], _ranks),
            tail=(["MB up + down / client / round"], _traffic),
            note="Tasks are clients. " + _budget(summary),
        )
    clients, methods = summary["tasks"], summary["methods"]
    head = ["method", "ranks", *clients, "average", "worst", "std", "MB up + down / client / round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [name, *_ranks(m)]
        cells += [plus_minus(m["tasks"][c]) for c in clients]
        cells += [plus_minus(m["average"]), plus_minus(m["worst"]), plus_minus(m["std_across_tasks"])]
        cells += _traffic(m)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Scores in %, mean ± sd over seeds {summary.get('seeds')}. " + _budget(summary)]
    return "\n".join([*lines, *compare.footer(summary)])
