"""Federated fine-tuning, top to bottom: N clients, one federated method (Fed-ALoRA or a
baseline), rounds of local training and aggregation in the in-process simulator, personalised
(and, where the method has one, global) evaluation, exact communication counts.

Clients come from a suite or a list of tasks (one task per client, as in the paper), or from a
Dirichlet(alpha) split of the pooled tasks (each client gets a skewed mix of tasks; its score is
the mix-weighted average of its model's scores on those tasks' test splits).

Seeds: ``seed`` decides every client's initial adapter (an independent draw per client), who
takes part in each round (``federation.fraction`` < 1) and each client's local batches and
dropout in each round; ``clients.split_seed`` decides the train / test splits (and the
Dirichlet partition). The same config gives the same numbers.

Everything lands in one run folder::

    config.yaml          the resolved configuration (re-run with --config RUN/config.yaml)
    rounds.jsonl         one line per round: participants, local loss, exact bytes up and down per
                         client, and (on evaluated rounds) personalised and global scores
    checkpoint/          the state after the last finished round (--resume continues from it)
    adapters/<client>/   each client's final adapter (asymlora format)
    alora/               where the method has one (Fed-ALoRA): the federation as one adapter
                         (one A per client, the shared B, task routing: task id i = client i)
    server.safetensors   the server's final state (FLoRA: the merged update; FlexLoRA: the
                         global dense update; zeropad: the global adapter at the largest rank)
    clients.json         per client: tasks, rank, examples, final scores, bytes per round
    predictions.json     the last evaluated round's per-question predictions of every client
    results.json         method, scores per client, average, global scores, communication, and
                         (``client_results``) those predictions, from which comparisons draw intervals
    results.md           the same as a table
    plots/               score per client, score vs round, bytes vs score (PNG)
    tensorboard/         loss, bytes and scores per round (with the tensorboard extra)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from statistics import fmean
from typing import Any

from ..adapters import (
    export_peft,
    load_adapter,
    read_tensors,
    save_adapter,
    wrap,
)
from ..adapters.io import atomic_write, write_tensors
from ..adapters.model import check_ranks_fit
from ..config import ConfigError, read_json, to_dict
from ..data.clients import ClientData, build_clients, clients_digest
from ..data.task import Task
from ..engines.local import LocalSimulator, engine_client, find_checkpoint
from ..errors import InputError, MissingFileError
from ..eval.report import TaskResult
from ..eval.runner import evaluate_task
from ..fedconfig import FederatedConfig, load_config, save_config
from ..models import load_model, placement, resolve_device
from ..progress import progress_bar
from ..runfolder import RunFolder, cpu_text, folder_lock, total_cpu, write_jsonl
from ..threads import use_threads
from ..train import pad_id_of
from ..train.loop import tensorboard_writer


# --- evaluation ---------------------------------------------------------------------------------
def task_result(model, tokenizer, task: Task, cfg: FederatedConfig) -> TaskResult:
    """The model on the first ``eval.limit`` examples of the task's test split, with the per-question
    predictions that the comparison's intervals are drawn from."""
    return evaluate_task(
        model,
        tokenizer,
        task,
        limit=cfg.eval.limit,
        seed=cfg.clients.split_seed,
        batch_size=cfg.eval.batch_size,
        max_length=cfg.eval.max_length,
    )


def task_score(model, tokenizer, task: Task, cfg: FederatedConfig) -> float:
    """The model's primary score on the task's test questions (see ``task_result``)."""
    return task_result(model, tokenizer, task, cfg).score


ClientResults = dict[str, list[TaskResult]]
"""client name -> its model's result on each of its tasks (in the client's task order)."""


def personalised_results(
    sim: LocalSimulator, tokenizer, clients: list[ClientData], cfg: FederatedConfig
) -> ClientResults:
    """Each client's own model on its own tasks, as the paper evaluates."""
    results = {}
    for i, client in enumerate(clients):
        model = sim.load_client(i)
        results[client.name] = [task_result(model, tokenizer, t, cfg) for t in client.tasks]
    return results


def share_weighted(results: ClientResults, clients: list[ClientData]) -> dict[str, float]:
    """Each client's score: its tasks' scores weighted by the client's shares of them."""
    return {c.name: sum(r.score * w for r, w in zip(results[c.name], c.shares, strict=True)) for c in clients}


def save_predictions(path: Path, rnd: int, results: ClientResults) -> None:
    """The evaluated round's per-question predictions (``PREDICTIONS``), replaced atomically at each
    evaluated round, so a finished or resumed run's results.json can carry the last ones."""
    content = {"round": rnd, "clients": {name: [asdict(r) for r in rs] for name, rs in results.items()}}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(content) + "\n"))


PREDICTIONS = "predictions.json"


def global_scores(
    sim: LocalSimulator, tokenizer, clients: list[ClientData], cfg: FederatedConfig
) -> dict[str, float] | None:
    """The method's global model on every client's tasks (share-weighted); None without one."""
    if not cfg.eval.global_model or sim.global_kind() is None:
        return None
    tasks = {t.name: t for c in clients for t in c.tasks}
    with sim.use_global() as model:
        per_task = {name: task_score(model, tokenizer, t, cfg) for name, t in tasks.items()}
    return {
        c.name: sum(per_task[t.name] * w for t, w in zip(c.tasks, c.shares, strict=True)) for c in clients
    }


def should_evaluate(rnd: int, cfg: FederatedConfig) -> bool:
    every = cfg.eval.every
    return rnd == cfg.federation.rounds or (every > 0 and rnd % every == 0)


# --- the per-round record -----------------------------------------------------------------------
def scores_record(personal: dict[str, float], glob: dict[str, float] | None) -> dict[str, Any]:
    return {
        "scores": personal,
        "average": fmean(personal.values()),
        "global_scores": glob,
        "global_average": fmean(glob.values()) if glob else None,
    }


# --- the run ------------------------------------------------------------------------------------
def make_simulator(cfg: FederatedConfig, clients: list[ClientData], base, tokenizer) -> LocalSimulator:
    """The simulator for this config: one engine client per data client, at its rank."""
    ranks = cfg.adapter.ranks_for(len(clients))
    engine_clients = [
        engine_client(c, r, cfg.adapter.alpha_for(r), tokenizer, cfg.train.max_length)
        for c, r in zip(clients, ranks, strict=True)
    ]
    template = cfg.adapter.template()
    method = cfg.federation.make_method()
    return LocalSimulator(
        base,
        method,
        engine_clients,
        template,
        cfg.train,
        fraction=cfg.federation.fraction,
        seed=cfg.seed,
        pad_id=pad_id_of(tokenizer),
        min_clients=cfg.federation.min_clients,
        limits=cfg.federation.limits(),
        wire=cfg.federation.wire(),
        round_train=lambda rnd: cfg.federation.train_for_round(cfg.train, rnd),
    )


# What a --resume may change: evaluation, the device, and more rounds (unless a round_schedule
# spreads the lr over them: then the lr of every round depends on their number).
RESUMABLE = ("eval", "device", "federation.rounds", "train.threads")


def resumable(cfg: FederatedConfig) -> tuple[str, ...]:
    """The settings a --resume of ``cfg``'s run may change."""
    fixed = () if cfg.federation.round_schedule == "constant" else ("federation.rounds",)
    return tuple(key for key in RESUMABLE if key not in fixed)


def run(
    cfg: FederatedConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_client: Callable[[int, int, list[dict]], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the federation described by ``cfg`` and write its run folder; returns results.json's
    content. ``resume`` continues from the folder's checkpoint (the last finished round),
    changing only ``RESUMABLE`` settings; ``overwrite`` starts a folder that holds a run again;
    without either such a folder is refused. The folder is locked while the run writes it, and
    nothing is written before the clients, the model, the ranks and the checkpoint are checked.
    ``on_client(round, client, history)`` is called after each client's local training."""
    if cfg.federation.central_dp != "off":
        raise ConfigError(
            f"federation.central_dp={cfg.federation.central_dp!r}: central DP is applied by Flower's "
            "strategy wrappers, on the Flower engine (docs/flower.md); the simulator does not run it"
        )
    out = Path(cfg.output_dir)
    with folder_lock(out, log, wait=False):
        folder = RunFolder.open(
            cfg, save_config, resume=resume, overwrite=overwrite, may_change=resumable(cfg)
        )
        use_threads(cfg.train.threads, log)
        clients = build_clients(cfg.clients)
        check_fits(cfg, len(clients), log)
        base, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
        base.to(resolve_device(cfg.device))
        sim = make_simulator(cfg, clients, base, tokenizer)
        records = restore_rounds(sim, cfg, resume, log, clients_digest(clients))
        folder.start(sim.round, log)
        log(f"run folder: {out}")
        log(f"model: {cfg.model} on {placement(base)}")
        log(f"{cfg.federation.method}: {len(clients)} clients: {', '.join(c.name for c in clients)}")
        return federate(cfg, sim, clients, tokenizer, records, log, on_client)


def check_fits(cfg: FederatedConfig, n_clients: int, log: Callable[[str], None]) -> None:
    """Before any weight is read: every client's rank within the model's layers (``check_ranks``)
    and the training step of the largest client within the memory free on the device, both from
    the model's config on the meta device."""
    from .dryrun import check_step_memory, meta_base

    shapes, base = meta_base(cfg.model, cfg.dtype)
    check_ranks(cfg, base, n_clients, log)
    largest = replace(cfg.adapter.template(), r=max(cfg.adapter.ranks_for(n_clients)))
    check_step_memory(wrap(base, largest), shapes, cfg.train, resolve_device(cfg.device))


def check_ranks(cfg: FederatedConfig, base, n_clients: int, log: Callable[[str], None]) -> None:
    """Every client's rank (and d_m) within the target modules' dimensions; a note where d_m
    exceeds every rank (each client then sees at most r_i of B_base's d_m directions)."""
    ranks = cfg.adapter.ranks_for(n_clients)
    keys = {"adapter.r": ranks[0]} if cfg.adapter.ranks is None else {}
    keys |= {f"adapter.ranks[{i}]": r for i, r in enumerate(cfg.adapter.ranks or [])}
    if cfg.federation.make_method().adapter_kind == "factored":  # the layer with a shared B_base of width d_m
        keys["adapter.d_m"] = cfg.adapter.d_m
        if cfg.adapter.d_m > max(ranks):
            log(f"note: adapter.d_m={cfg.adapter.d_m} exceeds every client's rank (largest {max(ranks)})")
    check_ranks_fit(base, cfg.adapter.template(), keys)


def restore_rounds(sim: LocalSimulator, cfg: FederatedConfig, resume: bool, log, data: str) -> list[dict]:
    """The per-round records of the checkpoint a resume continues from (none without one),
    refused where it was written on other data than ``data`` (``clients_digest``; a checkpoint
    from before the digest was kept is taken as it is)."""
    out = Path(cfg.output_dir)
    checkpoint = find_checkpoint(out / "checkpoint") if resume else None
    if checkpoint is None:
        if resume:
            log(f"no checkpoint in {out}: starting from round 1")
        return []
    state = sim.restore(checkpoint)
    if state.get("data") not in (None, data):
        raise InputError(
            f"{checkpoint}: this checkpoint (round {sim.round}) was written while training on other data: "
            "the clients' examples changed since (a task file, the suite or the split)",
            hint="restore the data the run started with, or give --overwrite to start again",
        )
    records = state.get("rounds")
    if not isinstance(records, list) or len(records) != sim.round or sim.round > cfg.federation.rounds:
        raise InputError(
            f"{checkpoint}: a checkpoint after round {sim.round} with {_count(records)} round records "
            f"is not one of this run (federation.rounds={cfg.federation.rounds})",
            hint="give --overwrite to start again, or the config this run was made with",
        )
    log(f"resumed after round {sim.round}")
    return records


def _count(records: Any) -> str:
    return str(len(records)) if isinstance(records, list) else "no"


def federate(
    cfg: FederatedConfig,
    sim: LocalSimulator,
    clients: list[ClientData],
    tokenizer,
    records: list[dict],
    log: Callable[[str], None],
    on_client: Callable[[int, int, list[dict]], None] | None,
) -> dict[str, Any]:
    """The rounds after those in ``records``, then the final adapters and results."""
    out, data = Path(cfg.output_dir), clients_digest(clients)
    write_jsonl(out / "rounds.jsonl", records)
    writer = tensorboard_writer(out)
    for rnd in range(sim.round + 1, cfg.federation.rounds + 1):
        total = len(sim.aggregator.participants(rnd))
        with progress_bar(
            total=total, desc=f"round {rnd}/{cfg.federation.rounds}", unit="client", leave=False
        ) as bar:
            cpu = time.process_time()
            record = sim.aggregator.record(sim.run_round(_advancing(bar, clients, on_client)), records)
            record["cpu_seconds"] = time.process_time() - cpu
        for kind in ("dropped", "rejected"):
            for name, why in record[kind].items():
                log(f"round {rnd}: {kind} client {name}: {why}")
        if should_evaluate(rnd, cfg):
            cpu = time.process_time()
            personal = personalised_results(sim, tokenizer, clients, cfg)
            save_predictions(out / PREDICTIONS, rnd, personal)
            record |= scores_record(
                share_weighted(personal, clients), global_scores(sim, tokenizer, clients, cfg)
            )
            record["eval_cpu_seconds"] = time.process_time() - cpu
        records.append(record)
        write_jsonl(out / "rounds.jsonl", records)
        sim.save(out / "checkpoint", {"rounds": records, "data": data})
        log(round_line(record))
        if writer is not None:
            log_round(writer, record)
    if writer is not None:
        writer.close()

    save_adapters(sim, clients, out)
    results = summarize(cfg, sim, clients, records, last_predictions(out / PREDICTIONS, records))
    (out / "clients.json").write_text(json.dumps(results["clients"], indent=2) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(results) + "\n")
    plot_run(records, results, out / "plots")
    log(to_markdown(results))
    return results


def _advancing(
    bar, clients: list[ClientData], on_client: Callable | None
) -> Callable[[int, int, list[dict]], None]:
    """``on_client`` that also advances the round's progress bar by one client."""

    def done(rnd: int, i: int, history: list[dict]) -> None:
        bar.set_postfix(client=clients[i].name)
        bar.update(1)
        if on_client is not None:
            on_client(rnd, i, history)

    return done


def log_round(writer, record: dict[str, Any]) -> None:
    """A round's loss, bytes and (on evaluated rounds) scores into TensorBoard, at step = round."""
    rnd = record["round"]
    scalars = {"loss": fmean(record["loss"].values()), "bytes_up": record["bytes_up"],
               "bytes_down": record["bytes_down"], "cumulative_bytes": record["cumulative_bytes"]}  # fmt: skip
    if "average" in record:
        scalars["personalised_average"] = record["average"]
        scalars |= {f"score/{name}": score for name, score in record["scores"].items()}
    if record.get("global_average") is not None:
        scalars["global_average"] = record["global_average"]
    for key, value in scalars.items():
        writer.add_scalar(f"federate/{key}", value, rnd)


def round_line(record: dict[str, Any]) -> str:
    line = f"round {record['round']}: loss {fmean(record['loss'].values()):.4f}"
    line += f", {record['bytes_up']:,.0f} B up / {record['bytes_down']:,.0f} B down per client"
    if "average" in record:
        line += f", personalised {record['average']:.2f}"
    if record.get("global_average") is not None:
        line += f", global {record['global_average']:.2f}"
    return line


# --- final adapters -----------------------------------------------------------------------------
def save_adapters(sim: LocalSimulator, clients: list[ClientData], out: Path) -> None:
    """Each client's adapter, the server's state, and the federation as one adapter where the
    method has that view (Fed-ALoRA's combined ALoRA adapter)."""
    for i, client in enumerate(clients):
        save_adapter(sim.load_client(i), out / "adapters" / client.name)
    write_tensors(sim.server, out / "server.safetensors")
    combined = sim.method.combined_adapter(sim.client_config(0), sim.states, sim.server)
    if combined is not None:
        save_adapter(sim.wrap_with(*combined), out / sim.method.combined_folder)


def client_names(run_dir: Path) -> list[str]:
    path = run_dir / "clients.json"
    if not path.is_file():
        raise MissingFileError(
            f"{run_dir}: no clients.json, so not a finished run of asymlora federate",
            hint="a Flower run keeps each client's adapter in adapters/<client> (asymlora eval --adapter reads it)",
        )
    clients = read_json(path)
    if not (
        isinstance(clients, list)
        and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in clients)
    ):
        raise InputError(f"{path}: not the clients.json of a federate run (a list of clients with names)")
    return [c["name"] for c in clients]


def export_client(
    run_dir: str | Path, client: int | str, folder: str | Path, license: str | None = None
) -> Path:
    """Write one client's final model (base + its adapter) as a PEFT LoRA folder. ``client`` is
    its index or name. Fed-ALoRA-het clients export at rank d_m (A' = M A, B' = B_base + B2 B1);
    a method whose clients are more than a LoRA on W0 folds the rest in (FLoRA: the update merged
    into the base, see ``FederatedMethod.export_model``). The model card gives the client's data,
    the federation's settings, its final score and ``license`` (None: the base's, where known)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    names = client_names(run_dir)
    if isinstance(client, int):
        if not 0 <= client < len(names):
            raise InputError(f"client index {client} out of range: this run has {len(names)} clients")
        client = names[client]
    if client not in names:
        raise InputError(f"no client {client!r} in {run_dir}; clients: {', '.join(names)}")
    base, _ = load_model(cfg.model, dtype=cfg.dtype)
    model = load_adapter(base, run_dir / "adapters" / client)
    method = cfg.federation.make_method()
    model = method.export_model(model, lambda: read_tensors(run_dir / "server.safetensors"))
    return export_peft(
        model, folder, card=client_card(cfg, read_json(run_dir / "clients.json"), client, license)
    )


def client_card(
    cfg: FederatedConfig, clients: list[dict], client: str, license: str | None
) -> dict[str, Any]:
    """The model card's content for one client's export: its score, data and the settings."""
    entry = next(c for c in clients if c["name"] == client)
    score = entry.get("score")
    return {
        "task": f"client {client}",
        "scores": [] if score is None else [{"task": client, "metric": "personalised score", "score": score}],
        "data": {"client": client, **to_dict(cfg.clients)},
        "settings": {
            "model": cfg.model,
            "dtype": cfg.dtype,
            **{k: to_dict(getattr(cfg, k)) for k in ("federation", "adapter", "train")},
        },  # fmt: skip
        "license": license,
    }


# --- results ------------------------------------------------------------------------------------
def last_predictions(path: Path, records: list[dict]) -> dict[str, list[dict]] | None:
    """The per-question predictions of the last evaluated round, if ``path`` holds that round's."""
    last = next(r for r in reversed(records) if "scores" in r)
    if not path.exists():
        return None
    saved = read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("clients"), dict):
        raise InputError(
            f"{path} is not a predictions file of this run",
            hint="delete it: the run's results then carry no per-question predictions",
        )
    return saved["clients"] if saved.get("round") == last["round"] else None


def summarize(
    cfg: FederatedConfig,
    sim: LocalSimulator,
    clients: list[ClientData],
    records: list[dict],
    predictions: dict[str, list[dict]] | None = None,
) -> dict[str, Any]:
    """results.json from the rounds' records; its ``clients`` list is clients.json. ``predictions``:
    the last evaluated round's per-client task results (with per-question predictions), kept under
    ``client_results`` for the comparison's intervals."""
    last = next(r for r in reversed(records) if "scores" in r)
    detail = []
    for i, c in enumerate(clients):
        sent = [r["comm"][c.name] for r in records if c.name in r["comm"]]
        detail.append(
            {
                "name": c.name,
                "tasks": {t.name: w for t, w in zip(c.tasks, c.shares, strict=True)},
                "rank": sim.clients[i].rank,
                "alpha": sim.clients[i].alpha,
                "train_examples": sim.clients[i].n_examples,
                "rounds_taken_part": len(sent),
                "score": last["scores"][c.name],
                "global_score": (last["global_scores"] or {}).get(c.name),
                "bytes_up_per_round": fmean(s["bytes_up"] for s in sent) if sent else 0.0,
                "bytes_down_per_round": fmean(s["bytes_down"] for s in sent) if sent else 0.0,
                "params_up_per_round": fmean(s["params_up"] for s in sent) if sent else 0.0,
                "params_down_per_round": fmean(s["params_down"] for s in sent) if sent else 0.0,
            }
        )
    return {
        "method": cfg.federation.method,
        "model": cfg.model,
        "seed": cfg.seed,
        "rounds": cfg.federation.rounds,
        "fraction": cfg.federation.fraction,
        "local_steps": cfg.train.steps,
        "ranks": [d["rank"] for d in detail],
        "global_model": sim.global_kind(),
        "scores": last["scores"],
        "average": last["average"],
        "global_scores": last["global_scores"],
        "global_average": last["global_average"],
        "bytes_up_per_client_round": fmean(r["bytes_up"] for r in records),
        "bytes_down_per_client_round": fmean(r["bytes_down"] for r in records),
        "total_bytes": sum(c["bytes_up"] + c["bytes_down"] for r in records for c in r["comm"].values()),
        "cpu_seconds": {
            "rounds": total_cpu(r.get("cpu_seconds") for r in records),
            "evaluation": total_cpu(r.get("eval_cpu_seconds") for r in records if "scores" in r),
        },
        "clients": detail,
        "client_results": predictions,
    }


def to_markdown(results: dict[str, Any]) -> str:
    """The final scores and communication as a Markdown table, one row per client."""
    glob = results["global_scores"]
    lines = [
        f"{results['method']} on {results['model']}: {results['rounds']} rounds x {results['local_steps']} "
        f"local steps, fraction {results['fraction']}, seed {results['seed']}",
        "",
        "| client | rank | personalised | global | bytes up / round | bytes down / round |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in results["clients"]:
        g = f"{glob[c['name']]:.2f}" if glob else "-"
        lines.append(
            f"| {c['name']} | {c['rank']} | {c['score']:.2f} | {g} "
            f"| {c['bytes_up_per_round']:,.0f} | {c['bytes_down_per_round']:,.0f} |"
        )
    g_avg = f"{results['global_average']:.2f}" if results["global_average"] is not None else "-"
    lines.append(
        f"| **average** | | **{results['average']:.2f}** | {g_avg} "
        f"| {results['bytes_up_per_client_round']:,.0f} | {results['bytes_down_per_client_round']:,.0f} |"
    )
    if "cpu_seconds" in results:  # results.json files written before runs counted CPU time have none
        lines += ["", cpu_text(results["cpu_seconds"])]
    return "\n".join(lines)


def plot_run(records: list[dict], results: dict[str, Any], folder: Path) -> list[Path]:
    """Three PNGs: final score per client, average score vs round, average score vs cumulative
    bytes per client (personalised, and global where the method has a global model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    evaluated = [r for r in records if "scores" in r]
    method = results["method"]
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(results["scores"])), 4))
    names = list(results["scores"])
    ax.bar(names, [results["scores"][n] for n in names], label="personalised")
    if results["global_scores"]:
        ax.plot(names, [results["global_scores"][n] for n in names], "k_", markersize=20, label="global")
    ax.set_ylabel("score")
    ax.set_title(f"{method}: final score per client")
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    ax.legend()
    paths.append(_save(fig, folder / "score_per_client.png"))

    for x_key, x_label, name in (
        ("round", "round", "score_vs_round.png"),
        ("cumulative_bytes", "bytes sent + received per client", "bytes_vs_score.png"),
    ):
        paths.append(_save(score_figure(evaluated, x_key, x_label, method), folder / name))
    return paths


def score_figure(evaluated: list[dict], x_key: str, x_label: str, title: str):
    """Average score (personalised, and global where there is one) against ``x_key``; the round
    axis has whole rounds only."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r[x_key] for r in evaluated]
    ax.plot(xs, [r["average"] for r in evaluated], "o-", label="personalised")
    if any(r["global_average"] is not None for r in evaluated):
        ax.plot(xs, [r["global_average"] for r in evaluated], "s--", label="global")
    if x_key == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x_label)
    ax.set_ylabel("average score")
    ax.set_title(title)
    ax.legend()
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
