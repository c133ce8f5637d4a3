"""The Flower engine: a ServerApp and a ClientApp (flwr >= 1.42, Message API) that run the same
federated method functions as the in-process simulator, across real machines.

One SuperNode per client; its ``--node-config "partition-id=i"`` says which client it is (client
``i`` of the recipe's ``build_clients``: task ``i`` under the task partition). The run is
configured through Flower's run config (``[tool.flwr.app.config]`` in pyproject.toml, or
``flwr run --run-config``): the same settings as ``asymlora federate`` (method, rounds, model,
ranks, tasks or suite, seed, output folder, and any ``section.key=value`` override).

Messages, for a federation of N clients::

    query.init    server -> every node: build your initial adapter;
                  node -> server: its index, examples, rank, scale, and the parts setup needs
    train         server -> round participants: your pending download (setup's parts in round
                  1, the last aggregate otherwise), apply it, train one local round;
                  node -> server: method.upload(state), mean loss
    query.finish  server -> every node with a pending download: apply it, save your adapter

The server runs ``method.setup`` and ``method.aggregate`` exactly as the simulator does, in the
order of client indices, so the aggregated tensors agree with the simulator's for the same
config. A download is applied by the client just before its next training (or at the finish),
which is what the simulator computes too: ``apply_download`` depends only on the client's
state, the download and its round-0 state.

Bad clients, as in the simulator (``asymlora.federated.validate``): every upload is checked
against the layout the client's own round-0 state fixes (names, shapes at its declared rank,
float dtype, finite values, ``federation.max_upload_norm``). A reply that fails the checks, an
error reply (the ClientApp raised) and no reply within ``timeout-s`` leave that client out of
the round, logged with the reason, the node and the client, and kept in ``rounds.jsonl``
(``rejected`` / ``dropped``). The round goes on with the rest when at least
``federation.min_clients`` uploads are left, and fails the run otherwise. A client left out
keeps its state from before the round (its trained state is only kept once the server sends it
the round's download), as in the simulator. A download carries the round it answers and is sent
again after a lost message or reply; the client applies each round's download once.

State: a client's adapter tensors (A, M, B1, B2, ...; FLoRA's merged ``base_delta``), its
round-0 state and its last trained state live in ``context.state``, which the SuperNode keeps
across Flower's short-lived ClientApp processes. The base model is loaded once per process (a
module-level cache); under Flower's stock launcher a process serves one message, under
``asymlora.engines.flower_exec`` every task is a fork of one warm process. Local training uses
a fresh AdamW each round, as the simulator does, so no optimizer state has to persist.

FLoRA: the client keeps the running sum of the merged updates (``<module>.base_delta``, the
method's own per-client formula) and its base weights are set to W0 + base_delta before each
training. The simulator adds each round's update to one shared base instead; the two differ
only by float rounding ((W0 + d1) + d2 against W0 + (d1 + d2)). As the simulator's shared base
does, a client left out of a round still gets that round's merge: the server sends it the merges
of the rounds it missed (``merge-<round>``) with its next message.

Local differential privacy (docs/flower.md): a SuperNode started with ``--node-config
"partition-id=i local-dp='clipping_norm=C,sensitivity=S,epsilon=E,delta=D'"`` sends its
uploads through Flower's ``LocalDpMod`` (the train handler's mod ``local_dp``): the update from
the uploaded parts before training (for the averaging methods exactly what the server sent) is
clipped to norm C and Gaussian noise is added. Only fedit, ffa, fedsa and fedalora; a node with
``local-dp`` refuses any other method, and bad values, with an error naming the reason.

``test-poison`` (run config) is a test hook only: ``"<partition-id>:<kind>,<kind>;..."`` makes
that node corrupt its upload in rounds 1, 2, ... (kinds: ``nan``, ``inf``, ``extra-name``,
``shape``, ``huge``, ``dtype``, ``raise``, ``-`` for an honest round). Leave it empty.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod
from flwr.common import log as flwr_log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file
from torch import Tensor

from ..adapters import AdapterConfig, AsymLoraModel, save_adapter, wrap
from ..federated import FederatedMethod
from ..federated.common import BASE_DELTA, Tensors, part, select
from ..federated.registry import averaging, known, rank_problem
from ..federated.validate import Spec, UploadLimits, check_upload
from ..models import load_model
from ..train import pad_id_of
from .federation import FederatedConfig, adapter_template, build_clients, engine_client, load_config
from .local import Client, add_to_weights, client_config, mean_loss, set_trainable, train_locally
from .round import Member, Server

INIT, FINISH = f"{MessageType.QUERY}.init", f"{MessageType.QUERY}.finish"
STATE, ROUND0, TRAINED = "asymlora-state", "asymlora-init", "asymlora-trained"  # context.state keys
APPLIED, ANSWERS = "asymlora-applied", "answers"  # the last download round applied; a download's round
MERGE, MERGED = "merge", "asymlora-merged"  # FLoRA: a missed round's merge; the last one applied
SETUP, DOWNLOAD, UPLOAD, TENSORS = "setup", "download", "upload", "tensors"
SERVER_FILE, ROUNDS_FILE = "server.safetensors", "rounds.jsonl"
BASE_DELTA_FILE = "base_delta.safetensors"
POISON_KEY = "test-poison"

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
    return cfg.federation.make_method()


# --- test hook: a node that corrupts its upload ----------------------------------------------------
POISONS = ("nan", "inf", "extra-name", "shape", "huge", "dtype", "raise", "-")


def poison_plan(run_config: Mapping[str, Any]) -> dict[int, list[str]]:
    """``test-poison`` parsed: partition-id -> the kind of corruption per round (``-``: none)."""
    plan: dict[int, list[str]] = {}
    for item in str(run_config.get(POISON_KEY, "")).split(";"):
        if not item.strip():
            continue
        index, _, kinds = item.partition(":")
        plan[int(index)] = [k.strip() for k in kinds.split(",")]
        bad = [k for k in plan[int(index)] if k not in POISONS]
        if bad:
            raise ValueError(f"{POISON_KEY}: unknown kind(s) {bad}; expected {', '.join(POISONS)}")
    return plan


def poison_of(run_config: Mapping[str, Any], index: int, rnd: int) -> str:
    kinds = poison_plan(run_config).get(index, [])
    return kinds[rnd - 1] if 0 < rnd <= len(kinds) and kinds[rnd - 1] != "-" else ""


def poisoned(upload: Mapping[str, Tensor], kind: str) -> Tensors:
    """``upload`` corrupted as ``kind`` says (test hook)."""
    out = {k: v.clone() for k, v in upload.items()}
    first = sorted(out)[0]
    if kind in ("nan", "inf"):
        out[first].view(-1)[0] = float(kind)
    elif kind == "extra-name":
        out[first.rpartition(".")[0] + ".lora_extra"] = torch.zeros(2, 2)
    elif kind == "shape":
        out[first] = torch.zeros(out[first].shape[0] + 1, *out[first].shape[1:])
    elif kind == "huge":
        out = {k: v * 1e6 for k, v in out.items()}
    elif kind == "dtype":
        out[first] = out[first].double()
    return out


# --- the client ---------------------------------------------------------------------------------
_BASES: dict[str, tuple[Any, Any]] = {}  # model name -> (base, tokenizer), once per process
_WRAPPED: dict[str, AsymLoraModel] = {}  # model name -> the base wrapped at its current shape
_ORIGINAL: dict[str, dict[str, Tensor]] = {}  # model name -> adapted base weights before a merge


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


@torch.no_grad()
def set_base_delta(name: str, model: AsymLoraModel, deltas: Mapping[str, Tensor]) -> None:
    """The adapted base weights of ``model`` set to W0 + delta (W0 kept aside the first time)."""
    layers = {n: layer.base_layer for n, layer in model.adapted.items()}
    original = _ORIGINAL.get(name)
    if original is not None:
        for n, weight in original.items():
            layers[n].weight.copy_(weight)
    if deltas:
        if original is None:
            _ORIGINAL[name] = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        add_to_weights(layers, deltas)


@dataclass
class Node:
    """One client as its SuperNode sees it: the run's config, the method, which client it is."""

    cfg: FederatedConfig
    method: FederatedMethod
    index: int
    client: Client
    config: AdapterConfig
    local_dp: LocalDpMod | None = None

    @classmethod
    def from_context(cls, context: Context) -> Node:
        cfg = federated_config(context.run_config)
        method = method_of(cfg)
        dp = check_local_dp(context, method)
        index = int(context.node_config["partition-id"])
        data = build_clients(cfg.clients)
        if not 0 <= index < len(data):
            raise ValueError(f"partition-id={index}, but this federation has {len(data)} clients")
        threads = int(context.run_config.get("num-threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        rank = cfg.adapter.ranks_for(len(data))[index]
        client = engine_client(cfg, data[index], rank, base_model(cfg.model)[1])
        config = client_config(adapter_template(cfg), method, client, cfg.seed, index)
        return cls(cfg, method, index, client, config, dp)

    def model(self, state: Mapping[str, Tensor]) -> AsymLoraModel:
        """The base holding ``state`` (FLoRA: W0 + its base_delta), the method's parts trainable."""
        model = wrapped(self.cfg.model, self.config)
        set_base_delta(self.cfg.model, model, select(state, {BASE_DELTA}))
        model.load_adapter_state_dict({k: v for k, v in state.items() if part(k) != BASE_DELTA})
        return set_trainable(model, self.method)

    def train(self, state: Mapping[str, Tensor], rnd: int) -> tuple[Tensors, float]:
        """One local round from ``state``, seeded as the simulator seeds client ``index``."""
        pad = pad_id_of(base_model(self.cfg.model)[1])
        new, history = train_locally(
            self.model(state), self.client, self.cfg.train, self.cfg.seed, rnd, self.index, pad
        )
        return new | select(state, {BASE_DELTA}), mean_loss(history)


def to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> Tensors:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def receive(node: Node, context: Context, content: RecordDict) -> Tensors:
    """The client's state after what the message carries: setup's parts (round 1), or the
    download of the round it last trained in, applied to that trained state. Without a download
    the trained state is dropped (the server left it out) and the state stays as it was.

    A download carries the round it answers (0: setup). The server sends it again when the
    message that carried it got no reply (a timeout: the node may or may not have applied it);
    one of a round this node has applied already is ignored."""
    state = from_record(context.state[STATE])
    trained = from_record(context.state[TRAINED]) if TRAINED in context.state else None
    if TRAINED in context.state:
        del context.state[TRAINED]
    applied = int(context.state[APPLIED]["round"]) if APPLIED in context.state else -1
    answers = int(content["config"].get(ANSWERS, -1)) if "config" in content else -1
    fresh = answers > applied  # not a download applied before (resent), and not none at all
    if fresh and SETUP in content:
        state |= from_record(content[SETUP])
        context.state[ROUND0] = to_record(state)
    elif fresh and DOWNLOAD in content:
        if trained is None:
            raise RuntimeError("a download arrived, but this node has no trained state waiting for it")
        init = from_record(context.state[ROUND0])
        state = node.method.apply_download(trained, from_record(content[DOWNLOAD]), init)
    if SETUP in content or DOWNLOAD in content:
        context.state[APPLIED] = ConfigRecord({"round": max(applied, answers)})
    state = receive_merges(context, content, state)
    context.state[STATE] = to_record(state)
    return state


def receive_merges(context: Context, content: RecordDict, state: Tensors) -> Tensors:
    """FLoRA: add the merges of rounds this client was left out of to its base_delta, each
    round once (a merge sent again after a lost reply is skipped)."""
    done = int(context.state[MERGED]["round"]) if MERGED in context.state else 0
    rounds = sorted(int(k.rpartition("-")[2]) for k in content if k.startswith(f"{MERGE}-"))
    for r in rounds:
        if r > done:
            for k, v in from_record(content[f"{MERGE}-{r}"]).items():
                state[k] = state[k] + v if k in state else v
            done = r
    if rounds:
        context.state[MERGED] = ConfigRecord({"round": done})
    return state


# --- local differential privacy (Flower's LocalDpMod), switched on per node -------------------------
LOCAL_DP = "local-dp"  # the node-config key: "clipping_norm=C,sensitivity=S,epsilon=E,delta=D"
LOCAL_DP_FIELDS = ("clipping_norm", "sensitivity", "epsilon", "delta")
REFERENCE = "asymlora-dp-reference"  # context.state: the upload's parts before training


def local_dp_params(node_config: Mapping[str, Any]) -> dict[str, float] | None:
    """The node's local-DP parameters from its ``--node-config`` (``local-dp``), or None when
    the key is absent or empty. Bad values raise ValueError naming the key."""
    raw = node_config.get(LOCAL_DP, "")
    if raw is None or str(raw).strip() == "":
        return None
    where = f"node config {LOCAL_DP}={str(raw)!r}"
    form = ",".join(f"{k}=..." for k in LOCAL_DP_FIELDS)
    params: dict[str, float] = {}
    for item in str(raw).split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or key not in LOCAL_DP_FIELDS or key in params:
            raise ValueError(f"{where}: expected {form} (each once), got {item.strip()!r}")
        try:
            params[key] = float(value)
        except ValueError:
            raise ValueError(f"{where}: {key}={value!r} is not a number") from None
        if not math.isfinite(params[key]):
            raise ValueError(f"{where}: {key} must be finite")
    missing = [k for k in LOCAL_DP_FIELDS if k not in params]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (expected {form})")
    for key in ("clipping_norm", "sensitivity", "epsilon"):
        if params[key] <= 0:
            raise ValueError(f"{where}: {key} must be > 0")
    if not 0 < params["delta"] < 1:
        raise ValueError(f"{where}: delta must be in (0, 1)")
    return params


def local_dp_mod(node_config: Mapping[str, Any]) -> LocalDpMod | None:
    """Flower's ``LocalDpMod`` with the node's parameters, or None when local DP is off."""
    params = local_dp_params(node_config)
    return None if params is None else LocalDpMod(**params)


def noise_std(mod: LocalDpMod) -> float:
    """The standard deviation of the Gaussian noise ``mod`` adds to every value (its formula)."""
    return mod.sensitivity * math.sqrt(2 * math.log(1.25 / mod.delta)) / mod.epsilon


def local_dp_unfit(method: FederatedMethod) -> str | None:
    """Why local DP is refused for ``method``, or None. It is supported for the methods whose
    server averages the uploads and sends the average back (``not_an_average`` is None): the
    client's uploaded parts before training are then exactly what the server sent it, so the
    update is clipped from a point the server knows, with the upload's names and shapes. The
    others are refused with the method's own reason (docs/flower.md)."""
    if method.not_an_average is None:
        return None
    return (
        f"local DP (local-dp in the node config) does not fit method {method.name}: "
        f"{method.not_an_average}; it is only supported where the server averages the uploads "
        f"and sends the average back ({known(averaging())}), so that the update is clipped from "
        "the server's own download"
    )


def check_local_dp(context: Context, method: FederatedMethod) -> LocalDpMod | None:
    """The node's LocalDpMod (None when off); raises ValueError when its parameters are bad or
    the run's method does not fit."""
    mod = local_dp_mod(context.node_config)
    reason = local_dp_unfit(method) if mod is not None else None
    if reason is not None:
        raise ValueError(reason)
    return mod


def local_dp(msg: Message, context: Context, call_next: Any) -> Message:
    """The train handler's mod: when the node config sets ``local-dp``, the upload goes through
    Flower's ``LocalDpMod``: the update (upload minus the upload's parts before training, which
    the train handler keeps as the reference) is clipped to ``clipping_norm`` (L2 over every
    tensor together) and Gaussian noise of std ``sensitivity * sqrt(2 ln(1.25 / delta)) /
    epsilon`` is added to every value. Bad parameters or a method it does not fit give an error
    reply naming the reason, before any training; nothing un-noised is sent."""
    if str(context.node_config.get(LOCAL_DP, "") or "").strip() == "":
        return call_next(msg, context)  # off: the run config is not even read here
    try:
        mod = check_local_dp(context, method_of(federated_config(context.run_config)))
        assert mod is not None
    except ValueError as err:
        flwr_log(logging.ERROR, str(err))
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=str(err)), reply_to=msg)
    try:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if REFERENCE not in context.state or UPLOAD not in reply.content:
            reason = "local DP: the train reply carries no upload or no reference was kept"
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
        reference = from_record(context.state[REFERENCE])
    finally:
        if REFERENCE in context.state:
            del context.state[REFERENCE]  # not kept across rounds
    upload = from_record(reply.content[UPLOAD])
    if set(upload) != set(reference):
        reason = f"local DP: the upload's tensors differ from the reference's ({len(upload)} against {len(reference)})"
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
    # LocalDpMod reads the reference from the message it is given (exactly one ArrayRecord) and
    # needs the reply's keys in the same order: both sorted here.
    keys = sorted(upload)
    reply.content[UPLOAD] = to_record({k: upload[k] for k in keys})
    ref_msg = Message(RecordDict({"reference": to_record({k: reference[k] for k in keys})}), reply_to=msg)
    # LocalDpMod draws from numpy's global generator; under the warm launcher every task is a
    # fork of one process, so every task would start from the same generator state (the same
    # noise for every client and round). Fresh OS entropy for each upload.
    np.random.seed()
    return mod(ref_msg, context, lambda _msg, _context: reply)


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
    if node.local_dp is not None:
        meta |= {"dp-clip": node.local_dp.clipping_norm, "dp-std": noise_std(node.local_dp)}
    content = {
        "meta": ConfigRecord(meta),
        TENSORS: to_record({k: v for k, v in state.items() if part(k) in parts}),
    }
    return Message(RecordDict(content), reply_to=msg)


@client_app.train(mods=[local_dp])
def client_train(msg: Message, context: Context) -> Message:
    """Apply the pending download, train one local round, send ``method.upload`` of the state
    (kept as the trained state until the server's download for it arrives)."""
    node = Node.from_context(context)
    rnd = int(msg.content["config"]["round"])
    state = receive(node, context, msg.content)
    if node.local_dp is not None:  # the point local DP measures the update from (see local_dp)
        context.state[REFERENCE] = to_record(node.method.upload(state))
    poison = poison_of(context.run_config, node.index, rnd)
    if poison == "raise":
        raise RuntimeError(f"{POISON_KEY}: client {node.index} raises in round {rnd}")
    new, loss = node.train(state, rnd)
    context.state[TRAINED] = to_record(new)
    upload = node.method.upload(new)
    if poison:
        upload = poisoned(upload, poison)
    content = {UPLOAD: to_record(upload), "metrics": MetricRecord({"loss": loss})}
    return Message(RecordDict(content), reply_to=msg)


@client_app.query("finish")
def client_finish(msg: Message, context: Context) -> Message:
    """Apply the last download and save this client's adapter under ``output_dir/adapters``
    (FLoRA: its merged update beside it, ``base_delta.safetensors``)."""
    node = Node.from_context(context)
    state = receive(node, context, msg.content)
    folder = Path(node.cfg.output_dir) / "adapters" / node.client.name
    save_adapter(node.model(state), folder)
    merged = select(state, {BASE_DELTA})
    if merged:
        save_file({k: v.contiguous() for k, v in merged.items()}, str(folder / BASE_DELTA_FILE))
    return Message(RecordDict({}), reply_to=msg)


# --- the server ---------------------------------------------------------------------------------
def exchange(
    grid: Grid, messages: Mapping[int, Message], timeout: float
) -> tuple[dict[int, Message], dict[int, str]]:
    """Send ``messages`` (client index -> message) and wait up to ``timeout`` s: the replies
    by client, and why each other client has none (no reply in time, or an error reply)."""
    replies = list(grid.send_and_receive(list(messages.values()), timeout=timeout))
    by_node = {r.metadata.src_node_id: r for r in replies}
    got: dict[int, Message] = {}
    failed: dict[int, str] = {}
    for i, m in messages.items():
        reply = by_node.get(m.metadata.dst_node_id)
        if reply is None:
            failed[i] = f"no reply within {timeout:g} s"
        elif reply.has_error():
            failed[i] = f"the ClientApp failed: {reply.error.reason}"
        else:
            got[i] = reply
    return got, failed


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of {count} SuperNodes connected after {timeout} s")
        time.sleep(1.0)


Pending = tuple[str, Tensors, int]  # (SETUP or DOWNLOAD, tensors, the round it answers)


def message(
    node_id: int,
    kind: str,
    rnd: int,
    pending: Pending | None = None,
    merges: Mapping[int, Tensors] | None = None,
) -> Message:
    """A message of round ``rnd``, carrying the node's pending setup or download if any, and
    (FLoRA) the merges of the rounds it was left out of, as ``merge-<round>``."""
    config: dict[str, int] = {"round": rnd}
    records: dict[str, Any] = {}
    if pending is not None:
        name, tensors, answers = pending
        config[ANSWERS] = answers
        records[name] = to_record(tensors)
    for r, tensors in sorted((merges or {}).items()):
        records[f"{MERGE}-{r}"] = to_record(tensors)
    content = RecordDict({"config": ConfigRecord(config), **records})
    return Message(content, dst_node_id=node_id, message_type=kind, group_id=str(rnd))


def warn(text: str) -> None:
    """A warning for the run's log: Flower's logger, which ``flwr run --stream`` shows."""
    flwr_log(logging.WARNING, text)


def join(
    grid: Grid, nodes: Sequence[int], cfg: FederatedConfig, timeout: float
) -> tuple[list[Member], list[int], list[Tensors]]:
    """The init exchange: every client of 0..N-1 must answer with a layout the config agrees
    with; nodes of a higher partition-id sit this run out. Returns, by client index, the
    members, their node ids and their initial tensors."""
    n = cfg.clients.count()
    ranks = cfg.adapter.ranks_for(n)
    replies, failed = exchange(grid, {k: message(nid, INIT, 0) for k, nid in enumerate(nodes)}, timeout)
    members: dict[int, Member] = {}
    node_of: dict[int, int] = {}
    inits: dict[int, Tensors] = {}
    for k, reply in replies.items():
        meta = reply.content["meta"]
        i = int(meta["index"])
        if i in members:
            raise RuntimeError(f"two SuperNodes have partition-id={i}")
        node_of[i] = nodes[k]
        members[i] = Member(
            str(meta["name"]),
            int(meta["rank"]),
            int(meta["examples"]),
            float(meta["scale"]),
            f" (node {nodes[k]})",
        )
        inits[i] = from_record(reply.content[TENSORS])
        if "dp-clip" in meta:
            flwr_log(
                logging.INFO,
                f"init: client {members[i].label} uploads under local DP: update clipped to "
                f"{float(meta['dp-clip']):g}, noise std {float(meta['dp-std']):.4g} per value",
            )
        if members[i].rank != ranks[i]:
            raise RuntimeError(
                f"node {nodes[k]} (client {i}) declares rank {members[i].rank}, the config says {ranks[i]}"
            )
    missing = sorted(set(range(n)) - set(members))
    if missing:
        why = "; ".join(f"node {nodes[k]}: {r}" for k, r in failed.items())
        raise RuntimeError(
            f"no SuperNode answered as client(s) {missing} of 0..{n - 1}" + (f" ({why})" if why else "")
        )
    for k, reason in failed.items():
        warn(f"init: node {nodes[k]} did not answer ({reason}); it is not part of this run")
    for i in range(n):  # the layouts the uploads are held to come from these
        reason = check_init(inits[i], inits[0])
        if reason is not None:
            raise RuntimeError(f"client {members[i].label} sent an unusable initial state: {reason}")
    return [members[i] for i in range(n)], [node_of[i] for i in range(n)], [inits[i] for i in range(n)]


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Setup, ``federation.rounds`` rounds of train + validate + aggregate (``round.Server``, as
    in the simulator), then (``save-adapters``) the finish; writes
    ``output_dir/server.safetensors`` and ``output_dir/rounds.jsonl`` after every round."""
    cfg = federated_config(context.run_config)
    method = method_of(cfg)
    timeout = float(context.run_config.get("timeout-s", 600))
    n = cfg.clients.count()
    problem = rank_problem(method.name, cfg.adapter.ranks_for(n))
    if problem is not None:
        raise ValueError(problem)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    members, nodes, inits = join(grid, wait_for_nodes(grid, n, timeout), cfg, timeout)
    server = Server(
        method,
        members,
        fraction=cfg.federation.fraction,
        seed=cfg.seed,
        min_clients=cfg.federation.min_clients,
        limits=cfg.federation.limits(),
        warn=warn,
    )
    setups = server.setup(inits)
    pending: dict[int, Pending] = {i: (SETUP, setups[i], 0) for i in range(n)}
    # FLoRA: a round's merge reaches every client, also those left out of the round (as the
    # simulator's one shared base does); kept per client and round until the client confirms.
    merges: dict[int, dict[int, Tensors]] = {i: {} for i in range(n)}

    records: list[dict[str, Any]] = []
    flwr_log(logging.INFO, f"init: {n} clients joined in {time.monotonic() - started:.1f} s")
    for rnd in range(1, cfg.federation.rounds + 1):
        started = time.monotonic()
        chosen = server.participants(rnd)
        sent = {i: pending.pop(i, None) for i in chosen}
        msgs = {i: message(nodes[i], MessageType.TRAIN, rnd, sent[i], merges[i]) for i in chosen}
        replies, failed = exchange(grid, msgs, timeout)
        for i in chosen:
            if i in failed:  # the node may not have applied what it was sent: send it again
                if sent[i] is not None and i not in pending:
                    pending[i] = sent[i]
            else:
                merges[i] = {}
        uploads = [(i, upload_of(replies[i])) for i in chosen if i in replies]
        losses = {i: loss_of(reply) for i, reply in replies.items()}
        log = server.aggregate(rnd, uploads, losses, sorted(failed.items()))
        downloads = dict(zip(log.participants, log.downloads, strict=True))
        pending |= {i: (DOWNLOAD, d, rnd) for i, d in downloads.items()}
        if method.merges_into_base:
            for i in set(range(n)) - set(downloads):
                merges[i][rnd] = select(
                    method.apply_download(setups[i], log.downloads[0], setups[i]), {BASE_DELTA}
                )
        records.append(server.record(log, records))
        save_file({k: v.contiguous() for k, v in server.state.items()}, str(out / SERVER_FILE))
        (out / ROUNDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(
            f"round {rnd}: {records[-1]['bytes_up']:,.0f} B up / {records[-1]['bytes_down']:,.0f} B down "
            f"per client, {time.monotonic() - started:.2f} s"
        )

    if context.run_config.get("save-adapters", True):
        rounds = cfg.federation.rounds
        due = sorted(set(pending) | {i for i in range(n) if merges[i]})
        finish = {i: message(nodes[i], FINISH, rounds, pending.get(i), merges[i]) for i in due}
        _, failed = exchange(grid, finish, timeout)
        for i, reason in sorted(failed.items()):
            warn(f"finish: client {members[i].label} did not save: {reason}")


def check_init(init: Mapping[str, Tensor], first: Mapping[str, Tensor]) -> str | None:
    """Why a client's initial tensors cannot fix its layout, or None: the same names as client
    0's, float and finite (shapes may differ with the rank)."""
    if set(init) != set(first):
        return f"tensor names differ from client 0's ({len(init)} against {len(first)})"
    return check_upload(
        init, {k: Spec(tuple(v.shape), first[k].dtype) for k, v in init.items()}, UploadLimits()
    )


def upload_of(reply: Message) -> Any:
    """The tensors a train reply carries, or what the validator will refuse (None)."""
    try:
        return from_record(reply.content[UPLOAD])
    except Exception:  # noqa: BLE001 - a malformed reply is a rejected upload, not a crash
        return None


def loss_of(reply: Message) -> float:
    try:
        return float(reply.content["metrics"]["loss"])
    except Exception:  # noqa: BLE001
        return float("nan")
