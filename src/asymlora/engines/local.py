"""The in-process federated simulator: one base model, every client's adapter state, one client
after another.

Memory: one copy of the base model for the whole federation, plus N small adapter states (and
each client's round-0 state, which methods that restart adapters need). A client "runs" by
having its state copied into the one wrapped model; a client of another rank gets the base
re-wrapped at its rank (the base modules are the same objects, only the adapter layers change).

A round: the server's side is ``round.Server`` (participants, validation, ``min_clients``,
the method's aggregation, the record), the same as under Flower; the simulator runs the
clients::

    for i in server.participants(round):         # one after another, on the shared model
        load state_i, train the parts method.trainable() marks, local_train(seed, round, i)
        upload_i = method.upload(state_i)          # a client that raises is dropped
    log = server.aggregate(round, uploads, ...)    # validate, aggregate: one download each
    state_i = method.apply_download(state_i, download_i, init_i)

FLoRA merges a dense update into every client's base weight each round. All participants
receive the same update, so the simulator adds it once to the one shared base weight instead of
keeping a dense ``base_delta`` per client (the per-client formula and this give the same model;
a test checks it). Under partial participation a client that sat out a round then also sees that
round's merge, as FLoRA's global model does.

A checkpoint (every client's state, the server state, the merged base weights where a method
merges, and the caller's JSON record) is a folder written beside the old one and swapped in by
renames; restoring it and running the remaining rounds gives bit for bit the adapters of an
uninterrupted run, because every random choice is a function of (seed, round, client).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import AdapterConfig, AsymLoraModel, find_target_modules, read_tensors, wrap
from ..adapters.io import complete_folder, write_folder_atomically, write_tensors
from ..adapters.targets import weight_layout
from ..data.clients import ClientData
from ..errors import InputError
from ..federated import FederatedMethod
from ..federated.common import BASE_DELTA, A, Tensors, module_of, part, select
from ..federated.validate import UploadLimits
from ..runfolder import total_cpu
from ..train import TrainConfig, encode_tasks, local_train
from ..train.batches import Encoded, hash_seed
from .round import Member, RoundError, RoundLog, Server, from_wire, to_wire

STATE_FILE = "state.json"
SERVER_FILE = "server.safetensors"
BASE_FILE = "base_weights.safetensors"
CLIENTS_DIR = "clients"
FORMAT = "asymlora-federation"


@dataclass(frozen=True)
class Client:
    """A client as the engine sees it: tokenized training data and the shape of its adapter.

    ``encoded`` holds one list per task the client has (``local_train``'s input); ``alpha`` /
    ``rank`` is its LoRA scale."""

    name: str
    encoded: list[list[Encoded]]
    rank: int
    alpha: float

    @property
    def n_examples(self) -> int:
        """The client's aggregation weight: its number of training examples."""
        return sum(len(task) for task in self.encoded)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def engine_client(data: ClientData, rank: int, alpha: float, tokenizer, max_length: int) -> Client:
    """A client as an engine sees it: its examples tokenized (cut to ``max_length`` tokens), its
    rank and alpha."""
    return Client(data.name, encode_tasks(tokenizer, data.examples, max_length), rank, alpha)


def client_seed(seed: int, client: int) -> int:
    """The adapter-initialisation seed of a client: independent draws per client."""
    return hash_seed(seed, client) % (1 << 31)


def client_config(
    template: AdapterConfig, method: FederatedMethod, client: Client, seed: int, i: int
) -> AdapterConfig:
    """Client ``i``'s adapter: the federation's ``template`` at the client's rank and alpha, with
    the method's layer kind and the client's own initialisation seed."""
    return replace(
        template, method=method.adapter_kind, r=client.rank, alpha=client.alpha, seed=client_seed(seed, i)
    )


def set_trainable(model: AsymLoraModel, method: FederatedMethod) -> AsymLoraModel:
    """Let exactly the adapter tensors the method trains require gradients."""
    for name, layer in model.adapted.items():
        for pname, param in layer.named_parameters(recurse=False):
            param.requires_grad_(method.trainable(f"{name}.{pname}"))
    return model


def train_locally(
    model: AsymLoraModel, client: Client, train: TrainConfig, seed: int, rnd: int, i: int, pad_id: int
) -> tuple[Tensors, list[dict]]:
    """Client ``i``'s local round ``rnd`` on ``model`` (which holds its state, trainable parts
    set): the new adapter state and the training history. Any engine calls this, so a client
    trains the same way, with the same seed, wherever it runs."""
    history = local_train(model, client.encoded, train, hash_seed(seed, rnd, i), pad_id)
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}, history


def mean_loss(history: Sequence[Mapping[str, Any]]) -> float:
    """The mean training loss of a local round (NaN when it took no step)."""
    return fmean(h["loss"] for h in history) if history else float("nan")


@torch.no_grad()
def add_to_weights(layers: Mapping[str, nn.Module], deltas: Mapping[str, Tensor]) -> None:
    """W += delta at every module named in ``deltas`` (keys ``<module>.<part>``, delta
    (d_out, d_in), added in the layer's weight layout)."""
    for key, delta in deltas.items():
        layer = layers[module_of(key)]
        layer.weight.add_(weight_layout(layer, delta).to(layer.weight))  # its dtype and device


class LocalSimulator:
    """Runs a federated method over ``clients`` in this process, on the one ``base`` model.

    ``adapter`` is the template of every client's adapter (target modules, dropout, d_m, ...);
    its method, rank, alpha and seed are set per client. ``train`` is one local round of
    training (``train.steps`` optimizer steps, a fresh AdamW each round)."""

    def __init__(
        self,
        base: nn.Module,
        method: FederatedMethod,
        clients: Sequence[Client],
        adapter: AdapterConfig,
        train: TrainConfig,
        *,
        fraction: float = 1.0,
        seed: int = 0,
        pad_id: int = 0,
        min_clients: int = 1,
        limits: UploadLimits | None = None,
        wire: torch.dtype = torch.float32,
        round_train: Callable[[int], TrainConfig] | None = None,
    ) -> None:
        members = [Member(c.name, c.rank, c.n_examples, c.scale) for c in clients]
        self.aggregator = Server(
            method, members, fraction=fraction, seed=seed, min_clients=min_clients, limits=limits, wire=wire
        )
        self.base, self.method, self.clients = base, method, list(clients)
        self.train_cfg, self.seed, self.pad_id = train, seed, pad_id
        # round -> its local training (an lr over the rounds); by default train, every round
        self.round_train = round_train or (lambda rnd: self.train_cfg)
        self.template = replace(adapter, method=method.adapter_kind)
        self.base_layers = find_target_modules(base, adapter.target_modules, adapter.layers)
        self.model: AsymLoraModel | None = None
        self.round = 0
        self.states = self.aggregator.setup([self._initial_state(i) for i in range(len(clients))])
        self.inits = [{k: v.clone() for k, v in s.items()} for s in self.states]

    @property
    def server(self) -> Tensors:
        """The method's server state."""
        return self.aggregator.state

    @server.setter
    def server(self, state: Tensors) -> None:
        self.aggregator.state = state

    # --- the shared model -------------------------------------------------------------------
    def client_config(self, i: int) -> AdapterConfig:
        """Client ``i``'s adapter configuration (its layer kind, rank, alpha and seed)."""
        return client_config(self.template, self.method, self.clients[i], self.seed, i)

    def _wrap(self, config: AdapterConfig) -> AsymLoraModel:
        """The shared base wrapped with adapters of ``config``'s shape (re-wrapped only when the
        shape or scale differs from the current wrapping; the values are loaded afterwards)."""
        current = self.model.adapter_config if self.model is not None else None
        if current is None or _shape_of(current) != _shape_of(config):
            if self.model is not None:
                self.model.unload()
            self.model = wrap(self.base, config)
        return self.model

    def wrap_with(self, config: AdapterConfig, state: Mapping[str, Tensor]) -> AsymLoraModel:
        """The shared base with any adapter (``config``) holding ``state``: for views of the
        federation other than one client, such as Fed-ALoRA's combined ALoRA adapter."""
        model = self._wrap(config)
        model.load_adapter_state_dict(dict(state))
        return model

    def _initial_state(self, i: int) -> Tensors:
        if self.model is not None:
            self.model.unload()
        self.model = wrap(self.base, self.client_config(i))  # fresh draws from the client's seed
        return {k: v.clone() for k, v in self.model.adapter_state_dict().items()}

    def load_client(self, i: int) -> AsymLoraModel:
        """The shared model holding client ``i``'s adapter, with the method's trainable parts
        (and only those) requiring gradients."""
        model = self._wrap(self.client_config(i))
        model.load_adapter_state_dict(self.states[i])
        return set_trainable(model, self.method)

    # --- one round --------------------------------------------------------------------------
    def train_client(self, rnd: int, i: int) -> tuple[Tensors, list[dict]]:
        """Client ``i``'s side of round ``rnd``: local training on the shared model; returns its
        new state and the training history (the upload is ``method.upload`` of the state)."""
        train = self.round_train(rnd)
        return train_locally(self.load_client(i), self.clients[i], train, self.seed, rnd, i, self.pad_id)

    def client_upload(self, rnd: int, i: int) -> Tensors:
        """What client ``i`` sends in round ``rnd``, in the wire dtype (a hook: tests replace it
        to play a bad client)."""
        return to_wire(self.method.upload(self.states[i]), self.aggregator.wire)

    def run_round(self, on_client: Callable[[int, int, list[dict]], None] | None = None) -> RoundLog:
        """Train the round's participants, validate their uploads, aggregate the accepted ones and
        hand out the downloads; returns the log.

        A client whose training raises is dropped from the round; an upload that fails
        validation (see ``asymlora.federated.validate``) is rejected. Either way the client keeps
        its state from before the round and gets no download, as if it had sat out, and the
        reason is logged and kept in ``RoundLog.dropped`` / ``RoundLog.rejected``. With fewer
        than ``min_clients`` accepted uploads the round fails with ``RoundError`` and leaves the
        federation as it was before the round.

        ``on_client(round, client, history)`` is called after each client's local training
        (a hook for progress, and for tests that crash a run mid-round); what it raises ends
        the run."""
        rnd = self.round + 1
        before = list(self.states)
        uploads, losses, dropped = [], {}, []
        for i in self.aggregator.participants(rnd):
            try:
                state, history = self.train_client(rnd, i)
            except Exception as err:  # a crashing client must not end the federation
                dropped.append((i, f"local training failed: {type(err).__name__}: {err}"))
                continue
            self.states[i] = state
            uploads.append((i, self.client_upload(rnd, i)))
            losses[i] = mean_loss(history)
            if on_client is not None:
                on_client(rnd, i, history)
        try:
            log = self.aggregator.aggregate(rnd, uploads, losses, dropped)
        except RoundError:
            self.states = before
            raise
        for i, _ in log.rejected:
            self.states[i] = before[i]
        self._apply_downloads(log)
        self.round = rnd
        return log

    def _apply_downloads(self, log: RoundLog) -> None:
        """Each participant's state after its download; a dense update a method merges into
        the base (the same for every client) is added once, to the shared base."""
        merged: Tensors = {}
        for i, down in zip(log.participants, log.downloads, strict=True):
            new = self.method.apply_download(self.states[i], from_wire(down), self.inits[i])
            merged = select(new, {BASE_DELTA})  # this round's update, the same for every client
            self.states[i] = {k: v for k, v in new.items() if part(k) != BASE_DELTA}
        add_to_weights(self.base_layers, merged)  # W0 += delta, once, in the shared base

    # --- the global model -------------------------------------------------------------------
    def global_kind(self) -> str | None:
        """What the method's global model is (``FederatedMethod.global_model``: "adapter",
        "dense", "base"), or None where there is none. Before the first round there is none."""
        return None if self.round == 0 else self.method.global_model

    @contextmanager
    def use_global(self) -> Iterator[AsymLoraModel]:
        """The shared model set to the method's global model (see ``global_kind``) inside the
        block; the base weights are restored exactly on exit."""
        kind = self.global_kind()
        if kind is None:
            raise ValueError(f"{self.method.name} has no global model (only personalised ones)")
        if kind == "adapter":
            yield self._global_adapter()
            return
        model = self._wrap(self.client_config(0))
        # A method that merges into the base has merged into the shared base already.
        dense = {} if self.method.merges_into_base else self.method.global_delta(self.server)
        saved = {name: layer.weight.detach().clone() for name, layer in self.base_layers.items()}
        try:
            for layer in model.adapted.values():
                layer.disabled = True
            add_to_weights(self.base_layers, dense)
            yield model
        finally:
            for layer in model.adapted.values():
                layer.disabled = False
            with torch.no_grad():
                for name, layer in self.base_layers.items():
                    layer.weight.copy_(saved[name])

    def _global_adapter(self) -> AsymLoraModel:
        largest = max(range(len(self.clients)), key=lambda i: self.clients[i].rank)
        state = self.method.global_adapter(self.server, self.inits[largest])
        rank = int(next(v for k, v in state.items() if part(k) == A).shape[0])
        scale = self.clients[largest].scale  # keep the largest client's scale at the global rank
        config = replace(self.client_config(largest), r=rank, alpha=scale * rank)
        return self.wrap_with(config, state)

    # --- checkpoints ------------------------------------------------------------------------
    def save(self, folder: str | Path, record: Mapping[str, Any] | None = None) -> Path:
        """Write the federation's state after ``self.round`` rounds to ``folder`` atomically
        (into ``folder.tmp``, then swapped in by renames). ``record``: any JSON the caller wants
        back on restore (the run's per-round log)."""

        def fill(tmp: Path) -> None:
            (tmp / CLIENTS_DIR).mkdir()
            for i, state in enumerate(self.states):
                write_tensors(state, tmp / CLIENTS_DIR / f"{i}.safetensors")
            write_tensors(self.server, tmp / SERVER_FILE)
            if self.method.merges_into_base:
                weights = {name: layer.weight for name, layer in self.base_layers.items()}
                write_tensors(weights, tmp / BASE_FILE)
            meta = {"format": FORMAT, "round": self.round, "method": self.method.name}
            meta |= {"num_clients": len(self.clients), "record": dict(record or {})}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        return write_folder_atomically(folder, fill)

    def restore(self, folder: str | Path) -> dict[str, Any]:
        """Load a checkpoint written by ``save`` (of a simulator built with the same clients,
        method and seed); returns the caller's record. The base must be freshly loaded."""
        folder = Path(folder)
        state = _read_state(folder / STATE_FILE)
        if state.get("format") != FORMAT:
            raise InputError(f"{folder}: not a federation checkpoint")
        if (state["method"], state["num_clients"]) != (self.method.name, len(self.clients)):
            raise InputError(
                f"{folder}: checkpoint of {state['method']} with {state['num_clients']} clients, "
                f"but this run is {self.method.name} with {len(self.clients)}"
            )
        device = next(self.base.parameters()).device
        self.states = [
            _to(read_tensors(folder / CLIENTS_DIR / f"{i}.safetensors"), device)
            for i in range(len(self.clients))
        ]
        self.server = _to(read_tensors(folder / SERVER_FILE), device)
        if self.method.merges_into_base:
            with torch.no_grad():
                for name, weight in read_tensors(folder / BASE_FILE).items():
                    self.base_layers[name].weight.copy_(weight)
        self.round = int(state["round"])
        return state["record"]


def find_checkpoint(folder: str | Path) -> Path | None:
    """The last complete checkpoint at ``folder`` (or its ``.old`` twin), if any."""
    return complete_folder(folder, (STATE_FILE, SERVER_FILE))


def checkpoint_progress(folder: str | Path) -> tuple[int, float | None] | None:
    """(rounds done, CPU seconds so far) of the last complete federation checkpoint at ``folder``,
    None without one (a damaged one reads as none: a resume refuses it)."""
    found = find_checkpoint(folder)
    if found is None:
        return None
    try:
        state = _read_state(found / STATE_FILE)
    except InputError:
        return None
    rounds = state["record"].get("rounds") if isinstance(state["record"], dict) else None
    cpu = total_cpu(r.get("cpu_seconds") if isinstance(r, dict) else None for r in rounds or [None])
    return state["round"], cpu


def _read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, or one clear error naming the file."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable checkpoint state ({err})") from None
    keys = ("format", "round", "method", "num_clients", "record")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise InputError(f"{path}: not a federation checkpoint (expected the keys {', '.join(keys)})")
    if isinstance(state["round"], bool) or not isinstance(state["round"], int) or state["round"] < 0:
        raise InputError(f"{path}: round={state['round']!r} is not a round number")
    return state


def _shape_of(config: AdapterConfig) -> tuple:
    """The fields that decide an adapter's tensors and scale (not its initial values)."""
    return (config.method, config.r, config.alpha, config.num_experts, config.router, config.d_m)


def _to(tensors: Mapping[str, Tensor], device: torch.device) -> Tensors:
    return {k: v.to(device) for k, v in tensors.items()}
