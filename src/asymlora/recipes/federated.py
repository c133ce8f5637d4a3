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
    alora/               fedalora only: the federation as one ALoRA adapter (one A per client,
                         the shared B, task routing: task id i = client i)
    server.safetensors   the server's final state (FLoRA: the merged update; FlexLoRA: the
                         global dense update; zeropad: the global adapter at the largest rank)
    clients.json         per client: tasks, rank, examples, final scores, bytes per round
    results.json         method, scores per client, average, global scores, communication
    results.md           the same as a table
    plots/               score per client, score vs round, bytes vs score (PNG)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from ..adapters import (
    AdapterConfig,
    AsymLoraModel,
    export_peft,
    load_adapter,
    read_tensors,
    save_adapter,
    wrap,
)
from ..adapters.io import atomic_write
from ..config import ConfigError, apply_overrides, from_dict, merge, read_file, to_dict
from ..data.partition import dirichlet_split
from ..data.registry import SUITES, get_suite, get_task
from ..data.task import Task, continuation
from ..engines.local import Client, LocalSimulator, RoundLog, find_checkpoint
from ..eval.runner import evaluate_task
from ..federated import METHODS, get_method
from ..federated.common import BASE_DELTA, A, B
from ..federated.validate import NORMS, UploadLimits
from ..models import load_model
from ..train import Example, TrainConfig, encode_tasks, pad_id_of

PARTITIONS = ("task", "dirichlet")
METHOD_OPTIONS = ("reset_a_each_round", "dense_download")
DEVICES = ("auto", "cpu", "cuda")


# --- configuration ------------------------------------------------------------------------------
@dataclass
class FederationConfig:
    method: str = field(default="fedalora", metadata={"help": "one of " + ", ".join(METHODS)})
    rounds: int = field(default=3, metadata={"help": "communication rounds"})
    fraction: float = field(default=1.0, metadata={"help": "share of the clients taking part in a round"})
    reset_a_each_round: bool = field(
        default=False,
        metadata={"help": "fedalora / fedalora-het: the reference's per-round reset of A (a defect)"},
    )
    dense_download: bool = field(
        default=False, metadata={"help": "flora: send the merged product instead of the stacks"}
    )
    min_clients: int = field(
        default=1,
        metadata={"help": "fewest valid uploads a round may aggregate (after drops and rejections)"},
    )
    max_upload_norm: float | None = field(
        default=None, metadata={"help": "reject an upload whose L2 norm exceeds this (None: no bound)"}
    )
    upload_norm: str = field(
        default="total",
        metadata={"help": "what max_upload_norm bounds: total (all tensors together) | tensor (each)"},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"federation.method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds={self.rounds} must be >= 1")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"federation.fraction={self.fraction} must be in (0, 1]")
        accepted = {f.name for f in fields(METHODS[self.method])}
        for option in METHOD_OPTIONS:
            if getattr(self, option) and option not in accepted:
                raise ConfigError(f"federation.{option} is not an option of {self.method}")
        if self.min_clients < 1:
            raise ConfigError(f"federation.min_clients={self.min_clients} must be >= 1")
        bound = self.max_upload_norm
        if bound is not None and not (math.isfinite(bound) and bound > 0):
            raise ConfigError(f"federation.max_upload_norm={bound} must be a finite number > 0 (or null)")
        if self.upload_norm not in NORMS:
            raise ConfigError(
                f"federation.upload_norm={self.upload_norm!r} must be one of {', '.join(NORMS)}"
            )

    def limits(self) -> UploadLimits:
        """The upload checks' norm bound, for the engine."""
        return UploadLimits(self.max_upload_norm, self.upload_norm)

    def method_options(self) -> dict[str, Any]:
        """The options the chosen method takes, for ``get_method``."""
        accepted = {f.name for f in fields(METHODS[self.method])}
        return {option: getattr(self, option) for option in METHOD_OPTIONS if option in accepted}


@dataclass
class ClientAdapterConfig:
    r: int = field(default=8, metadata={"help": "every client's rank (when ranks is not given)"})
    ranks: list[int] | None = field(
        default=None, metadata={"help": "one rank per client, e.g. [64, 64, 32, 32, 16, 16, 8, 8]"}
    )
    alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha of every client; None: 2 r_i (scale 2, the reference)"}
    )
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None
    d_m: int = field(default=16, metadata={"help": "fedalora-het: width of the shared B_base"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"adapter.r={self.r} must be >= 1")
        if self.ranks is not None and (not self.ranks or min(self.ranks) < 1):
            raise ConfigError(f"adapter.ranks={self.ranks} must be a non-empty list of ranks >= 1")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"adapter.alpha={self.alpha} must be > 0")

    def ranks_for(self, num_clients: int) -> list[int]:
        return list(self.ranks) if self.ranks is not None else [self.r] * num_clients

    def alpha_for(self, rank: int) -> float:
        return self.alpha if self.alpha is not None else 2.0 * rank


@dataclass
class ClientsConfig:
    suite: str = field(default="fed-nlp", metadata={"help": "a named suite: one client per task"})
    tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "task names or .json/.jsonl files; when given, used instead of the suite"},
    )
    partition: str = field(
        default="task",
        metadata={"help": "task (one task per client) | dirichlet (split of the pooled tasks)"},
    )
    num_clients: int | None = field(default=None, metadata={"help": "dirichlet only: how many clients"})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "dirichlet only: small = more skewed"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/test splits and the partition"})
    max_train_per_task: int | None = field(
        default=None, metadata={"help": "cap on training examples per task"}
    )

    def __post_init__(self) -> None:
        if not self.tasks and self.suite not in SUITES:
            raise ConfigError(f"clients.suite={self.suite!r} is not one of {', '.join(SUITES)}")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"clients.partition={self.partition!r} must be one of {', '.join(PARTITIONS)}")
        if self.partition == "dirichlet" and (self.num_clients is None or self.num_clients < 1):
            raise ConfigError("clients.num_clients must be set (>= 1) for clients.partition='dirichlet'")
        if self.partition == "task" and self.num_clients is not None:
            raise ConfigError(
                "clients.num_clients is for the dirichlet partition; 'task' has one client per task"
            )
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"clients.dirichlet_alpha={self.dirichlet_alpha} must be > 0")
        if self.max_train_per_task is not None and self.max_train_per_task < 1:
            raise ConfigError(f"clients.max_train_per_task={self.max_train_per_task} must be >= 1")

    def task_names(self) -> list[str]:
        return list(self.tasks) if self.tasks else list(SUITES[self.suite])

    def count(self) -> int:
        """The number of clients, known without loading any data."""
        return self.num_clients if self.partition == "dirichlet" else len(self.task_names())


@dataclass
class FedEvalConfig:
    limit: int | None = field(default=50, metadata={"help": "test examples per task (None: all)"})
    batch_size: int = 16
    max_length: int = field(
        default=1024, metadata={"help": "context tokens at evaluation (prompt kept from the right)"}
    )
    every: int = field(default=1, metadata={"help": "evaluate every N rounds (0: only after the last)"})
    global_model: bool = field(default=True, metadata={"help": "also evaluate the global model, if any"})

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit={self.limit} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size} must be >= 1")
        if self.every < 0:
            raise ConfigError(f"eval.every={self.every} must be >= 0")


def _local_training() -> TrainConfig:
    return TrainConfig(steps=10, batch_size=8, lr=5e-4, schedule="constant")


@dataclass
class FederatedConfig:
    model: str = field(
        default="smollm2-135m", metadata={"help": "smollm2-135m, tiny-llama, a folder or a hub id"}
    )
    output_dir: str = "runs/federated"
    seed: int = field(default=0, metadata={"help": "adapters' initial draws, participants, local batches"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available) | cpu | cuda"})
    federation: FederationConfig = field(default_factory=FederationConfig)
    adapter: ClientAdapterConfig = field(default_factory=ClientAdapterConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(
        default_factory=_local_training, metadata={"help": "one local round: train.steps steps"}
    )
    eval: FedEvalConfig = field(default_factory=FedEvalConfig)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} must be one of {', '.join(DEVICES)}")
        n = self.clients.count()
        if self.adapter.ranks is not None and len(self.adapter.ranks) != n:
            raise ConfigError(
                f"adapter.ranks has {len(self.adapter.ranks)} entries but there are {n} clients; "
                "give one rank per client"
            )
        per_round = max(1, round(self.federation.fraction * n))
        if self.federation.min_clients > per_round:
            raise ConfigError(
                f"federation.min_clients={self.federation.min_clients} exceeds the {per_round} "
                f"client(s) taking part in a round ({n} clients, fraction {self.federation.fraction})"
            )
        ranks = self.adapter.ranks_for(n)
        if not METHODS[self.federation.method].heterogeneous and len(set(ranks)) > 1:
            raise ConfigError(
                f"adapter.ranks={ranks}: federation.method={self.federation.method!r} needs every "
                "client at the same rank; use zeropad, flora, flexlora or fedalora-het"
            )


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> FederatedConfig:
    """Defaults, then ``base`` (a dict), then the file, then ``section.key=value`` overrides.

    The local-training defaults (``_local_training``) are merged in first, so that a file giving
    only ``train.steps`` keeps the federated defaults for the other training fields."""
    data = merge({"train": to_dict(_local_training())}, base or {})
    data = merge(data, read_file(path) if path else {})
    return from_dict(FederatedConfig, apply_overrides(data, overrides or []))


def save_config(cfg: FederatedConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --- clients' data ------------------------------------------------------------------------------
@dataclass
class ClientData:
    """One client's data: the tasks it holds examples of, the share of its training examples
    from each (the weights of its score), and the examples, one list per task."""

    name: str
    tasks: list[Task]
    shares: list[float]
    examples: list[list[Example]]


def task_examples(task: Task, clients: ClientsConfig) -> list[Example]:
    """A task's train split as (prompt, continuation) examples, capped at max_train_per_task."""
    split = task.splits(clients.split_seed)["train"]
    if clients.max_train_per_task is not None:
        split = split.select(range(min(clients.max_train_per_task, len(split))))
    return [Example(task.prompt(ex), continuation(task.target(ex)), 0) for ex in split]


def build_clients(clients: ClientsConfig) -> list[ClientData]:
    """The federation's clients: one per task, or a Dirichlet split of the pooled tasks."""
    tasks = [get_task(t) for t in clients.tasks] if clients.tasks else get_suite(clients.suite)
    pools = [task_examples(task, clients) for task in tasks]
    if clients.partition == "task":
        names = unique_names([t.name for t in tasks])
        return [ClientData(n, [t], [1.0], [p]) for n, t, p in zip(names, tasks, pools, strict=True)]
    labels = [t for t, pool in enumerate(pools) for _ in pool]
    flat = [ex for pool in pools for ex in pool]
    parts = dirichlet_split(labels, clients.num_clients, clients.dirichlet_alpha, clients.split_seed)
    out = []
    for i, indices in enumerate(parts):
        held = sorted({labels[j] for j in indices})
        examples = [
            [replace(flat[j], task_id=k) for j in indices if labels[j] == t] for k, t in enumerate(held)
        ]
        shares = [len(e) / len(indices) for e in examples]
        out.append(ClientData(f"client-{i}", [tasks[t] for t in held], shares, examples))
    return out


def unique_names(names: list[str]) -> list[str]:
    """Names made unique by a suffix where two clients' tasks share one (two files ``a.jsonl``)."""
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


# --- evaluation ---------------------------------------------------------------------------------
def task_score(model, tokenizer, task: Task, cfg: FederatedConfig) -> float:
    """The model's primary score on the first ``eval.limit`` examples of the task's test split."""
    return evaluate_task(
        model,
        tokenizer,
        task,
        limit=cfg.eval.limit,
        seed=cfg.clients.split_seed,
        batch_size=cfg.eval.batch_size,
        max_length=cfg.eval.max_length,
    ).score


def personalised_scores(
    sim: LocalSimulator, tokenizer, clients: list[ClientData], cfg: FederatedConfig
) -> dict[str, float]:
    """Each client's own model on its own tasks (share-weighted), as the paper evaluates."""
    scores = {}
    for i, client in enumerate(clients):
        model = sim.load_client(i)
        per_task = [task_score(model, tokenizer, t, cfg) for t in client.tasks]
        scores[client.name] = sum(s * w for s, w in zip(per_task, client.shares, strict=True))
    return scores


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
def round_record(log: RoundLog, clients: list[ClientData], previous: list[dict]) -> dict[str, Any]:
    """A round as one JSON line: whose uploads were aggregated, loss, exact bytes per client, their
    means, the cumulative bytes (up + down) an average participant has sent and received so far,
    and the clients left out with the reason: ``dropped`` (training failed), ``rejected`` (the
    upload failed validation)."""
    names = [clients[i].name for i in log.participants]
    up = fmean(c["bytes_up"] for c in log.comm)
    down = fmean(c["bytes_down"] for c in log.comm)
    return {
        "round": log.round,
        "participants": names,
        "loss": dict(zip(names, log.loss, strict=True)),
        "comm": dict(zip(names, log.comm, strict=True)),
        "bytes_up": up,
        "bytes_down": down,
        "cumulative_bytes": (previous[-1]["cumulative_bytes"] if previous else 0.0) + up + down,
        "dropped": {clients[i].name: why for i, why in log.dropped},
        "rejected": {clients[i].name: why for i, why in log.rejected},
    }


def scores_record(personal: dict[str, float], glob: dict[str, float] | None) -> dict[str, Any]:
    return {
        "scores": personal,
        "average": fmean(personal.values()),
        "global_scores": glob,
        "global_average": fmean(glob.values()) if glob else None,
    }


def write_rounds(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# --- the run ------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_simulator(cfg: FederatedConfig, clients: list[ClientData], base, tokenizer) -> LocalSimulator:
    """The simulator for this config: one engine client per data client, at its rank."""
    ranks = cfg.adapter.ranks_for(len(clients))
    engine_clients = [
        Client(c.name, encode_tasks(tokenizer, c.examples, cfg.train.max_length), r, cfg.adapter.alpha_for(r))
        for c, r in zip(clients, ranks, strict=True)
    ]
    a = cfg.adapter
    template = AdapterConfig(
        method="lora", dropout=a.dropout, target_modules=a.target_modules, layers=a.layers, d_m=a.d_m
    )
    method = get_method(cfg.federation.method, **cfg.federation.method_options())
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
    )


def run(
    cfg: FederatedConfig,
    resume: bool = False,
    log: Callable[[str], None] = print,
    on_client: Callable[[int, int, list[dict]], None] | None = None,
) -> dict[str, Any]:
    """Run the federation described by ``cfg`` and write its run folder; returns results.json's
    content. ``resume`` continues from the folder's checkpoint (the last finished round).
    ``on_client(round, client, history)`` is called after each client's local training."""
    out = Path(cfg.output_dir)
    clients = build_clients(cfg.clients)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log(f"run folder: {out}")
    log(f"{cfg.federation.method}: {len(clients)} clients: {', '.join(c.name for c in clients)}")

    base, tokenizer = load_model(cfg.model)
    base.to(resolve_device(cfg.device))
    sim = make_simulator(cfg, clients, base, tokenizer)

    records: list[dict] = []
    checkpoint = find_checkpoint(out / "checkpoint") if resume else None
    if checkpoint is not None:
        records = sim.restore(checkpoint)["rounds"]
        log(f"resumed after round {sim.round}")
    elif resume:
        log(f"no checkpoint in {out}: starting from round 1")
    write_rounds(out / "rounds.jsonl", records)

    for rnd in range(sim.round + 1, cfg.federation.rounds + 1):
        record = round_record(sim.run_round(on_client), clients, records)
        for kind in ("dropped", "rejected"):
            for name, why in record[kind].items():
                log(f"round {rnd}: {kind} client {name}: {why}")
        if should_evaluate(rnd, cfg):
            record |= scores_record(
                personalised_scores(sim, tokenizer, clients, cfg), global_scores(sim, tokenizer, clients, cfg)
            )
        records.append(record)
        write_rounds(out / "rounds.jsonl", records)
        sim.save(out / "checkpoint", {"rounds": records})
        log(round_line(record))

    save_adapters(sim, clients, out)
    results = summarize(cfg, sim, clients, records)
    (out / "clients.json").write_text(json.dumps(results["clients"], indent=2) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(results) + "\n")
    plot_run(records, results, out / "plots")
    log(to_markdown(results))
    return results


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
    """Each client's adapter, the server's state, and for Fed-ALoRA the combined ALoRA adapter."""
    for i, client in enumerate(clients):
        save_adapter(sim.load_client(i), out / "adapters" / client.name)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in sim.server.items()}, str(out / "server.safetensors")
    )
    if sim.method.name == "fedalora":
        save_adapter(combined_alora(sim), out / "alora")


def combined_alora(sim: LocalSimulator):
    """Fed-ALoRA's federation as one ALoRA adapter: lora_A (N*r, d_in) stacks the clients' A's,
    lora_B is the server's shared B, and task routing sends task i to client i's A. (With
    fraction < 1 a client that sat out the last round still holds the previous B; the combined
    adapter uses the newest.)"""
    n = len(sim.clients)
    config = replace(
        sim.load_client(0).adapter_config, method="alora", router="task", num_experts=n, init_a="independent"
    )
    state = {}
    for key, b in sim.server.items():
        module = key.removesuffix(f".{B}")
        state[key] = b
        state[f"{module}.{A}"] = torch.cat([s[f"{module}.{A}"] for s in sim.states], dim=0)
    return sim.wrap_with(config, state)


def client_names(run_dir: Path) -> list[str]:
    return [c["name"] for c in json.loads((run_dir / "clients.json").read_text())]


def export_client(run_dir: str | Path, client: int | str, folder: str | Path) -> Path:
    """Write one client's final model (base + its adapter) as a PEFT LoRA folder. ``client`` is
    its index or name. Fed-ALoRA-het clients export at rank d_m (A' = M A, B' = B_base + B2 B1);
    FLoRA clients with the update merged into the base folded in (see ``flora_as_lora``)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    names = client_names(run_dir)
    if isinstance(client, int):
        if not 0 <= client < len(names):
            raise ValueError(f"client index {client} out of range: this run has {len(names)} clients")
        client = names[client]
    if client not in names:
        raise ValueError(f"no client {client!r} in {run_dir}; clients: {', '.join(names)}")
    base, _ = load_model(cfg.model)
    model = load_adapter(base, run_dir / "adapters" / client)
    if cfg.federation.method == "flora":
        model = flora_as_lora(model, read_tensors(run_dir / "server.safetensors"))
    return export_peft(model, folder)


@torch.no_grad()
def flora_as_lora(client: AsymLoraModel, server: Mapping[str, Tensor]) -> AsymLoraModel:
    """A FLoRA client's model, W0 + D + s B A with D the update merged into the base
    (``<module>.base_delta`` (d_out, d_in) in the server state), as one plain LoRA on W0 of rank
    r' = r + max d_in and scale 1:

        A' = [A; I; 0]   (r', d_in)        B' = [s B, D, 0]   (d_out, r')

    so that B' A' = s B A + D; the identity block passes x through to D unchanged. Large (rank
    about d_in), but exact and loadable by any PEFT LoRA reader. Consumes ``client``'s wrapping."""
    width = max(layer.d_in for layer in client.adapted.values())
    state = {}
    for name, layer in client.adapted.items():
        a, b = layer.lora_pair()
        delta = server[f"{name}.{BASE_DELTA}"].to(b)
        eye = torch.eye(layer.d_in, dtype=a.dtype, device=a.device)
        state[f"{name}.{A}"] = torch.cat([a, eye, a.new_zeros(width - layer.d_in, layer.d_in)])
        state[f"{name}.{B}"] = torch.cat(
            [layer.scale * b, delta, b.new_zeros(b.shape[0], width - layer.d_in)], 1
        )
    config = client.adapter_config
    rank = config.r + width
    merged = wrap(client.unload(), replace(config, r=rank, alpha=float(rank), dropout=0.0))
    merged.load_adapter_state_dict(state)
    return merged


# --- results ------------------------------------------------------------------------------------
def summarize(
    cfg: FederatedConfig, sim: LocalSimulator, clients: list[ClientData], records: list[dict]
) -> dict[str, Any]:
    """results.json from the rounds' records; its ``clients`` list is clients.json."""
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
        "clients": detail,
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
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r[x_key] for r in evaluated]
        ax.plot(xs, [r["average"] for r in evaluated], "o-", label="personalised")
        if any(r["global_average"] is not None for r in evaluated):
            ax.plot(xs, [r["global_average"] for r in evaluated], "s--", label="global")
        ax.set_xlabel(x_label)
        ax.set_ylabel("average score")
        ax.set_title(method)
        ax.legend()
        paths.append(_save(fig, folder / name))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
