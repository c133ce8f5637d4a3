"""The ClientApp: one SuperNode is one client of the federation (``--node-config
"partition-id=i"``: client ``i`` of the recipe's client list).

State: a client's adapter tensors (A, M, B1, B2, ...; FLoRA's merged ``base_delta``), the
parts of its round-0 state its method reads again (``init_parts``; often none) and, until the
server's answer comes, what its last training changed live in ``context.state``, which the
SuperNode keeps across Flower's short-lived ClientApp processes; each as one packed buffer
(``protocol.packed``), as are the tensors of every message but those a Flower DP piece reads. What depends only on the run and the node (the
config, the method, the client's tokenized data, the base model, the tokenizer) is cached per
process, so a process that serves several messages (the simulation engine, the in-process
tests) builds it once; under Flower's process launchers each message is a fresh process (or a
fork of a warm one, ``asymlora.engines.flower_exec``, which preloads the model). Local training
uses a fresh AdamW each round, as the simulator does, so no optimizer state has to persist.

FLoRA: the client keeps the running sum of the merged updates (``<module>.base_delta``, the
method's own per-client formula) and its base weights are set to W0 + base_delta before each
training. The simulator adds each round's update to one shared base instead; the two differ
only by float rounding ((W0 + d1) + d2 against W0 + (d1 + d2)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from ...adapters import AdapterConfig, AsymLoraModel, save_adapter, wrap
from ...adapters.io import write_tensors
from ...data.clients import build_clients
from ...fedconfig import FederatedConfig
from ...federated import FederatedMethod
from ...federated.common import BASE_DELTA, Tensors, part, select
from ...models import load_model, resolve_device
from ...train import pad_id_of
from ..local import (
    Client,
    add_to_weights,
    client_config,
    engine_client,
    mean_loss,
    set_trainable,
    train_locally,
)
from ..round import from_wire, to_wire
from .config import AppSettings, federated_config
from .dp import REFERENCE, check_local_dp, needs_reference, noise_std, privacy, wrapper_reads_arrays
from .protocol import (
    ANSWERS,
    BASE_DELTA_FILE,
    DOWNLOAD,
    MERGE,
    SETUP,
    TENSORS,
    UPLOAD,
    as_record,
    from_record,
    packed,
)

# context.state keys: the state, the round-0 parts the method reads again, and what the last
# training changed (the trained state is the state updated with it)
STATE, ROUND0, TRAINED = "asymlora-state", "asymlora-init", "asymlora-trained"
APPLIED = "asymlora-applied"  # context.state: the last download round applied
MERGED = "asymlora-merged"  # context.state (FLoRA): the last missed round's merge applied

# --- per-process caches ---------------------------------------------------------------------------
# A base model is cached under (model name, dtype, device): a run in bfloat16 and a run in
# float32 on one process each get their own, as do runs on two devices.
BaseKey = tuple[str, str, str]
_BASES: dict[BaseKey, tuple[Any, Any]] = {}  # -> (base, tokenizer)
_WRAPPED: dict[BaseKey, AsymLoraModel] = {}  # -> the base wrapped at its current shape
_ORIGINAL: dict[BaseKey, dict[str, Tensor]] = {}  # -> adapted base weights before a merge
_NODES: dict[tuple, Node] = {}  # (run config, node config) -> the node


def base_key(name: str, dtype: str = "auto", device: str = "cpu") -> BaseKey:
    """The cache key of a base model: its name, its ``dtype`` setting and the device ``device``
    resolves to (``auto`` is cuda where there is one)."""
    return name, dtype, str(resolve_device(device))


def base_model(key: BaseKey) -> tuple[Any, Any]:
    """The model and tokenizer of ``key`` (name, dtype, device), loaded once per process."""
    if key not in _BASES:
        name, dtype, device = key
        model, tokenizer = load_model(name, dtype=dtype)
        _BASES[key] = model.to(device), tokenizer
    return _BASES[key]


def wrapped(key: BaseKey, config: AdapterConfig, fresh: bool = False) -> AsymLoraModel:
    """The process's base model of ``key`` wrapped with adapters of ``config``: re-wrapped when
    the config differs in more than its seed, or with ``fresh`` (new draws from the config's
    seed). The seed decides only the initial draws, which the state loaded next replaces, so
    the nodes of one process (one client each) share the wrapping as the simulator's clients do."""
    current = _WRAPPED.get(key)
    if current is not None and not fresh and replace(current.adapter_config, seed=config.seed) == config:
        current.adapter_config = config
        return current
    base = current.unload() if current is not None else base_model(key)[0]
    _WRAPPED[key] = wrap(base, config)
    return _WRAPPED[key]


@torch.no_grad()
def set_base_delta(key: BaseKey, model: AsymLoraModel, deltas: Mapping[str, Tensor]) -> None:
    """The adapted base weights of ``model`` set to W0 + delta (W0 kept aside the first time)."""
    layers = {n: layer.base_layer for n, layer in model.adapted.items()}
    original = _ORIGINAL.get(key)
    if original is not None:
        for n, weight in original.items():
            layers[n].weight.copy_(weight)
    if deltas:
        if original is None:
            _ORIGINAL[key] = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        add_to_weights(layers, deltas)


@dataclass
class Node:
    """One client as its SuperNode sees it: the run's config, the method, which client it is."""

    cfg: FederatedConfig
    method: FederatedMethod
    index: int
    client: Client
    config: AdapterConfig
    local_dp: Any = None  # Flower's LocalDpMod, when the node config switches local DP on

    @property
    def base(self) -> BaseKey:
        """The base model this node trains on: the config's model, dtype and device."""
        return base_key(self.cfg.model, self.cfg.dtype, self.cfg.device)

    @classmethod
    def from_context(cls, context: Context) -> Node:
        """The node of this run and SuperNode, built once per process."""
        key = (tuple(sorted(context.run_config.items())), tuple(sorted(context.node_config.items())))
        if key not in _NODES:
            _NODES[key] = cls.build(context)
        return _NODES[key]

    @classmethod
    def build(cls, context: Context) -> Node:
        cfg = federated_config(context.run_config)
        method = cfg.federation.make_method()
        dp = check_local_dp(context, cfg.federation)
        index = int(context.node_config["partition-id"])
        data = build_clients(cfg.clients)
        if not 0 <= index < len(data):
            raise ValueError(f"partition-id={index}, but this federation has {len(data)} clients")
        threads = AppSettings.of(context.run_config).num_threads
        if threads > 0:
            torch.set_num_threads(threads)
        rank = cfg.adapter.ranks_for(len(data))[index]
        tokenizer = base_model(base_key(cfg.model, cfg.dtype, cfg.device))[1]
        client = engine_client(
            data[index], rank, cfg.adapter.alpha_for(rank), tokenizer, cfg.train.max_length
        )
        config = client_config(cfg.adapter.template(), method, client, cfg.seed, index)
        return cls(cfg, method, index, client, config, dp)

    def model(self, state: Mapping[str, Tensor]) -> AsymLoraModel:
        """The base holding ``state`` (FLoRA: W0 + its base_delta), the method's parts trainable."""
        model = wrapped(self.base, self.config)
        set_base_delta(self.base, model, select(state, {BASE_DELTA}))
        model.load_adapter_state_dict({k: v for k, v in state.items() if part(k) != BASE_DELTA})
        return set_trainable(model, self.method)

    def train(self, state: Mapping[str, Tensor], rnd: int) -> tuple[Tensors, float]:
        """One local round from ``state``, seeded as the simulator seeds client ``index``."""
        pad = pad_id_of(base_model(self.base)[1])
        train = self.cfg.federation.train_for_round(self.cfg.train, rnd)
        new, history = train_locally(
            self.model(state), self.client, train, self.cfg.seed, rnd, self.index, pad
        )
        return new | select(state, {BASE_DELTA}), mean_loss(history)


def receive(node: Node, context: Context, content: RecordDict) -> Tensors:
    """The client's state after what the message carries: setup's parts (round 1), or the
    download of the round it last trained in, applied to that trained state. Without a download
    the trained state is dropped (the server left it out) and the state stays as it was.

    A download carries the round it answers (0: setup). The server sends it again when the
    message that carried it got no reply (a timeout: the node may or may not have applied it);
    one of a round this node has applied already is ignored."""
    state = from_record(context.state[STATE])
    trained = None
    if TRAINED in context.state:
        trained = state | from_record(context.state.pop(TRAINED))
    applied = int(context.state[APPLIED]["round"]) if APPLIED in context.state else -1
    answers = int(content["config"].get(ANSWERS, -1)) if "config" in content else -1
    fresh = answers > applied  # not a download applied before (resent), and not none at all
    if fresh and SETUP in content:
        state |= from_record(content[SETUP])
        context.state[ROUND0] = packed(select(state, node.method.init_parts))
    elif fresh and DOWNLOAD in content:
        if trained is None:
            raise RuntimeError("a download arrived, but this node has no trained state waiting for it")
        init = from_record(context.state[ROUND0])
        state = node.method.apply_download(trained, from_wire(from_record(content[DOWNLOAD])), init)
    if SETUP in content or DOWNLOAD in content:
        context.state[APPLIED] = ConfigRecord({"round": max(applied, answers)})
    state = receive_merges(context, content, state)
    context.state[STATE] = packed(state)
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


# --- the handlers ---------------------------------------------------------------------------------
def client_init(msg: Message, context: Context) -> Message:
    """Build this client's round-0 adapter; send what the server's ``setup`` needs."""
    node = Node.from_context(context)
    model = wrapped(node.base, node.config, fresh=True)  # draws from the client's seed
    state = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    context.state[STATE] = packed(state)
    parts = node.method.uploads | node.method.shared_init
    meta = {"index": node.index, "name": node.client.name, "rank": node.client.rank}
    meta |= {"examples": node.client.n_examples, "scale": node.client.scale}
    if node.local_dp is not None:
        dp = node.local_dp
        meta |= {"dp-clip": dp.clipping_norm, "dp-std": noise_std(dp), "dp-delta": dp.delta}
    content = {
        "meta": ConfigRecord(meta),
        TENSORS: packed({k: v for k, v in state.items() if part(k) in parts}),
    }
    return Message(RecordDict(content), reply_to=msg)


def client_train(msg: Message, context: Context) -> Message:
    """Apply the pending download, train one local round, send ``method.upload`` of the state
    (kept as the trained state until the server's download for it arrives)."""
    node = Node.from_context(context)
    rnd = int(msg.content["config"]["round"])
    state = receive(node, context, msg.content)
    if needs_reference(msg, context):  # the point DP measures the update from (see dp.privacy)
        context.state[REFERENCE] = packed(node.method.upload(state))
    new, loss = node.train(state, rnd)
    context.state[TRAINED] = packed({k: v for k, v in new.items() if v is not state.get(k)})
    upload = to_wire(node.method.upload(new), node.cfg.federation.wire())
    record = as_record(upload, wrapper_reads_arrays(node.cfg.federation))
    content = {UPLOAD: record, "metrics": MetricRecord({"loss": loss})}
    return Message(RecordDict(content), reply_to=msg)


def client_finish(msg: Message, context: Context) -> Message:
    """Apply the last download and save this client's adapter under ``output_dir/adapters``
    (FLoRA: its merged update beside it, ``base_delta.safetensors``)."""
    node = Node.from_context(context)
    state = receive(node, context, msg.content)
    folder = Path(node.cfg.output_dir) / "adapters" / node.client.name
    save_adapter(node.model(state), folder)
    merged = select(state, {BASE_DELTA})
    if merged:
        write_tensors(merged, folder / BASE_DELTA_FILE)
    return Message(RecordDict({}), reply_to=msg)


TRAIN_MODS = [privacy]  # the train handler's mods


def client_app_with(*mods: Any) -> ClientApp:
    """The ClientApp, with ``mods`` around every handler (Flower's ``ClientApp(mods=...)``)."""
    app = ClientApp(mods=list(mods))
    app.query("init")(client_init)
    app.train(mods=TRAIN_MODS)(client_train)
    app.query("finish")(client_finish)
    return app


client_app = client_app_with()
