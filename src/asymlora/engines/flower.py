"""The Flower engine: a ServerApp and a ClientApp (flwr >= 1.42, Message API) that run the same
federated method functions as the in-process simulator, across real machines.

One SuperNode per client; its ``--node-config "partition-id=i"`` says which client it is (client
``i`` of the recipe's ``build_clients``: task ``i`` under the task partition). The run is
configured through Flower's run config (``[tool.flwr.app.config]`` in pyproject.toml, or
``flwr run --run-config``): the same settings as ``asymlora federate`` (method, rounds, model,
ranks, tasks or suite, seed, output folder, and any ``section.key=value`` override).

Messages, for a federation of N clients::

    query.init    server -> every node: build your initial adapter;
                  node -> server: its index, examples, scale, and the parts setup needs
    train         server -> round participants: your pending download (setup's parts in round
                  1, the last aggregate otherwise), apply it, train one local round;
                  node -> server: method.upload(state), mean loss
    query.finish  server -> every node with a pending download: apply it, save your adapter

The server runs ``method.setup`` and ``method.aggregate`` exactly as the simulator does, in the
order of client indices, so the aggregated tensors agree with the simulator's for the same
config. A download is applied by the client just before its next training (or at the finish),
which is what the simulator computes too: ``apply_download`` depends only on the client's
state, the download and its round-0 state.

State: a client's adapter tensors (A, M, B1, B2, ...) and its round-0 state live in
``context.state``, which the SuperNode keeps across Flower's short-lived ClientApp processes.
The base model is loaded once per process (a module-level cache); under Flower's default
subprocess isolation a process serves one message. Local training uses a fresh AdamW each
round, as the simulator does, so no optimizer state has to persist.

Not yet supported here: FLoRA (it merges a dense update into every client's base weights each
round, which would have to persist beside the adapter), and upload validation on the server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file
from torch import Tensor

from ..adapters import AdapterConfig, AsymLoraModel, save_adapter, wrap
from ..federated import FederatedMethod, get_method
from ..federated.comm import round_counts
from ..federated.common import BASE_DELTA, Tensors, part
from ..models import load_model
from ..recipes.federated import FederatedConfig, build_clients, load_config
from ..train import encode_tasks, local_train, pad_id_of
from ..train.batches import hash_seed
from .local import Client, adapter_method, client_seed, participants

INIT, FINISH = f"{MessageType.QUERY}.init", f"{MessageType.QUERY}.finish"
STATE, ROUND0 = "asymlora-state", "asymlora-init"  # keys in context.state
SETUP, DOWNLOAD, UPLOAD, TENSORS = "setup", "download", "upload", "tensors"
SERVER_FILE, ROUNDS_FILE = "server.safetensors", "rounds.jsonl"

# run-config key -> (config field, how to write its value as an override); "" keeps the default
RUN_CONFIG_KEYS = {
    "method": ("federation.method", "'{}'"),
    "rounds": ("federation.rounds", "{}"),
    "model": ("model", "'{}'"),
    "seed": ("seed", "{}"),
    "suite": ("clients.suite", "'{}'"),
    "tasks": ("clients.tasks", "{}"),
    "ranks": ("adapter.ranks", "{}"),
    "output-dir": ("output_dir", "'{}'"),
}


# --- configuration ------------------------------------------------------------------------------
def federated_config(run_config: Mapping[str, Any]) -> FederatedConfig:
    """The recipe's config from Flower's run config: ``config`` (a YAML/TOML file, optional), the
    keys of ``RUN_CONFIG_KEYS`` (lists as comma-separated strings), then ``overrides``
    (``section.key=value`` items separated by ``;``)."""
    overrides = []
    for key, (name, form) in RUN_CONFIG_KEYS.items():
        value = run_config.get(key, "")
        if value == "" or value is None:
            continue
        if key in ("tasks", "ranks"):
            items = [v.strip() for v in str(value).split(",") if v.strip()]
            value = "[" + ", ".join(items if key == "ranks" else [json.dumps(v) for v in items]) + "]"
        overrides.append(f"{name}={form.format(value)}")
    overrides += [o.strip() for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    return load_config(run_config.get("config") or None, overrides)


def method_of(cfg: FederatedConfig) -> FederatedMethod:
    method = get_method(cfg.federation.method, **cfg.federation.method_options())
    if BASE_DELTA in method.local:
        raise ValueError(f"{method.name} merges into the base weights; not supported on Flower yet")
    return method


def adapter_template(cfg: FederatedConfig, method: FederatedMethod) -> AdapterConfig:
    """Every client's adapter before its rank, alpha and seed (as ``make_simulator`` builds it)."""
    a = cfg.adapter
    template = AdapterConfig(
        method="lora", dropout=a.dropout, target_modules=a.target_modules, layers=a.layers, d_m=a.d_m
    )
    return replace(template, method=adapter_method(method))


# --- the client ---------------------------------------------------------------------------------
_BASES: dict[str, tuple[Any, Any]] = {}  # model name -> (base, tokenizer), once per process
_WRAPPED: dict[str, AsymLoraModel] = {}  # model name -> the base wrapped at its current shape


def base_model(name: str) -> tuple[Any, Any]:
    if name not in _BASES:
        _BASES[name] = load_model(name)
    return _BASES[name]


def wrapped(name: str, config: AdapterConfig) -> AsymLoraModel:
    """The process's base model wrapped with adapters of ``config`` (re-wrapped when it differs)."""
    current = _WRAPPED.get(name)
    if current is not None and current.adapter_config == config:
        return current
    base = current.unload() if current is not None else base_model(name)[0]
    _WRAPPED[name] = wrap(base, config)
    return _WRAPPED[name]


@dataclass
class Node:
    """One client as its SuperNode sees it: the run's config, the method, which client it is."""

    cfg: FederatedConfig
    method: FederatedMethod
    index: int
    client: Client
    config: AdapterConfig

    @classmethod
    def from_context(cls, context: Context) -> Node:
        cfg = federated_config(context.run_config)
        method = method_of(cfg)
        index = int(context.node_config["partition-id"])
        data = build_clients(cfg.clients)
        if not 0 <= index < len(data):
            raise ValueError(f"partition-id={index}, but this federation has {len(data)} clients")
        threads = int(context.run_config.get("num-threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        rank = cfg.adapter.ranks_for(len(data))[index]
        _, tokenizer = base_model(cfg.model)
        encoded = encode_tasks(tokenizer, data[index].examples, cfg.train.max_length)
        client = Client(data[index].name, encoded, rank, cfg.adapter.alpha_for(rank))
        config = replace(
            adapter_template(cfg, method), r=rank, alpha=client.alpha, seed=client_seed(cfg.seed, index)
        )
        return cls(cfg, method, index, client, config)

    def model(self, state: Mapping[str, Tensor]) -> AsymLoraModel:
        """The base holding ``state``, with the method's trainable parts (only) requiring grad."""
        model = wrapped(self.cfg.model, self.config)
        model.load_adapter_state_dict(dict(state))
        for name, layer in model.adapted.items():
            for pname, param in layer.named_parameters(recurse=False):
                param.requires_grad_(self.method.trainable(f"{name}.{pname}"))
        return model

    def train(self, state: Mapping[str, Tensor], rnd: int) -> tuple[Tensors, float]:
        """One local round from ``state``, seeded as the simulator seeds client ``index``."""
        model = self.model(state)
        seed = hash_seed(self.cfg.seed, rnd, self.index)
        pad = pad_id_of(base_model(self.cfg.model)[1])
        history = local_train(model, self.client.encoded, self.cfg.train, seed, pad)
        new = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
        return new, fmean(h["loss"] for h in history) if history else float("nan")


def to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> Tensors:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def receive(node: Node, context: Context, content: RecordDict) -> Tensors:
    """The client's state after applying what the message carries (setup parts or a download)."""
    state = from_record(context.state[STATE])
    if SETUP in content:
        state |= from_record(content[SETUP])
        context.state[ROUND0] = to_record(state)
    elif DOWNLOAD in content:
        init = from_record(context.state[ROUND0])
        state = node.method.apply_download(state, from_record(content[DOWNLOAD]), init)
    context.state[STATE] = to_record(state)
    return state


client_app = ClientApp()


@client_app.query("init")
def client_init(msg: Message, context: Context) -> Message:
    """Build this client's round-0 adapter; send what the server's ``setup`` needs."""
    node = Node.from_context(context)
    model = wrapped(node.cfg.model, node.config)  # fresh draws from the client's seed
    state = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    context.state[STATE] = to_record(state)
    parts = node.method.uploads | node.method.shared_init
    meta = {"index": node.index, "name": node.client.name, "rank": node.client.rank}
    meta |= {"examples": node.client.n_examples, "scale": node.client.scale}
    content = {
        "meta": ConfigRecord(meta),
        TENSORS: to_record({k: v for k, v in state.items() if part(k) in parts}),
    }
    return Message(RecordDict(content), reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Apply the pending download, train one local round, send ``method.upload`` of the state."""
    node = Node.from_context(context)
    rnd = int(msg.content["config"]["round"])
    state, loss = node.train(receive(node, context, msg.content), rnd)
    context.state[STATE] = to_record(state)
    content = {UPLOAD: to_record(node.method.upload(state)), "metrics": MetricRecord({"loss": loss})}
    return Message(RecordDict(content), reply_to=msg)


@client_app.query("finish")
def client_finish(msg: Message, context: Context) -> Message:
    """Apply the last download and save this client's adapter under ``output_dir/adapters``."""
    node = Node.from_context(context)
    state = receive(node, context, msg.content)
    save_adapter(node.model(state), Path(node.cfg.output_dir) / "adapters" / node.client.name)
    return Message(RecordDict({}), reply_to=msg)


# --- the server ---------------------------------------------------------------------------------
@dataclass
class Member:
    """A client as the server knows it, from its init reply."""

    node_id: int
    name: str
    rank: int
    examples: int
    scale: float


def exchange(grid: Grid, messages: Sequence[Message], timeout: float) -> list[Message]:
    """Send, wait for every reply, fail on the first error; replies in the messages' order."""
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    by_node = {r.metadata.src_node_id: r for r in replies}
    missing = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in by_node]
    if missing:
        raise RuntimeError(f"no reply from node(s) {missing} within {timeout} s")
    for r in replies:
        if r.has_error():
            raise RuntimeError(f"node {r.metadata.src_node_id} failed: {r.error.reason}")
    return [by_node[m.metadata.dst_node_id] for m in messages]


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of {count} SuperNodes connected after {timeout} s")
        time.sleep(1.0)


def message(node_id: int, kind: str, rnd: int, records: Mapping[str, Any]) -> Message:
    content = RecordDict({"config": ConfigRecord({"round": rnd}), **records})
    return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(rnd))


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Setup, ``federation.rounds`` rounds of train + aggregate, then (``save-adapters``) the
    finish; writes ``output_dir/server.safetensors`` and ``output_dir/rounds.jsonl`` after every
    round."""
    cfg = federated_config(context.run_config)
    method = method_of(cfg)
    timeout = float(context.run_config.get("timeout-s", 600))
    n = cfg.clients.count()
    nodes = wait_for_nodes(grid, n, timeout)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    replies = exchange(grid, [message(nid, INIT, 0, {}) for nid in nodes], timeout)
    members: dict[int, Member] = {}
    inits: dict[int, Tensors] = {}
    for nid, reply in zip(nodes, replies, strict=True):
        meta = reply.content["meta"]
        i = int(meta["index"])
        if i in members:
            raise RuntimeError(f"two SuperNodes have partition-id={i}")
        members[i] = Member(
            nid, str(meta["name"]), int(meta["rank"]), int(meta["examples"]), float(meta["scale"])
        )
        inits[i] = from_record(reply.content[TENSORS])
    if sorted(members) != list(range(n)):
        raise RuntimeError(f"partition-ids {sorted(members)} do not cover the {n} clients 0..{n - 1}")
    server, setups = method.setup([inits[i] for i in range(n)])
    pending: dict[int, tuple[str, Tensors]] = {i: (SETUP, setups[i]) for i in range(n)}

    records: list[dict[str, Any]] = []
    for rnd in range(1, cfg.federation.rounds + 1):
        chosen = participants(n, cfg.federation.fraction, cfg.seed, rnd)
        msgs = [
            message(members[i].node_id, MessageType.TRAIN, rnd, _pending(pending.pop(i, None)))
            for i in chosen
        ]
        replies = exchange(grid, msgs, timeout)
        uploads = [from_record(r.content[UPLOAD]) for r in replies]
        server, downloads = method.aggregate(
            uploads, [members[i].examples for i in chosen], server, [members[i].scale for i in chosen]
        )
        pending |= {i: (DOWNLOAD, d) for i, d in zip(chosen, downloads, strict=True)}
        records.append(round_record(rnd, [members[i].name for i in chosen], replies, uploads, downloads))
        save_file({k: v.contiguous() for k, v in server.items()}, str(out / SERVER_FILE))
        (out / ROUNDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(
            f"round {rnd}: {records[-1]['bytes_up']:,.0f} B up / {records[-1]['bytes_down']:,.0f} B down per client"
        )

    if context.run_config.get("save-adapters", True):
        rounds = cfg.federation.rounds
        exchange(
            grid,
            [message(members[i].node_id, FINISH, rounds, _pending(p)) for i, p in pending.items()],
            timeout,
        )


def _pending(item: tuple[str, Tensors] | None) -> dict[str, ArrayRecord]:
    return {} if item is None else {item[0]: to_record(item[1])}


def round_record(
    rnd: int, names: list[str], replies: list[Message], uploads: list[Tensors], downloads: list[Tensors]
) -> dict[str, Any]:
    """One line of rounds.jsonl: participants, loss and the exact bytes per client (the
    simulator's accounting, ``round_counts``), and the per-client means."""
    comm = round_counts(uploads, downloads)
    return {
        "round": rnd,
        "participants": names,
        "loss": {n: float(r.content["metrics"]["loss"]) for n, r in zip(names, replies, strict=True)},
        "comm": dict(zip(names, comm, strict=True)),
        "bytes_up": fmean(c["bytes_up"] for c in comm),
        "bytes_down": fmean(c["bytes_down"] for c in comm),
    }
