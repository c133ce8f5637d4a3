"""The ServerApp: the init exchange (who is which client, their round-0 tensors), then
``federation.rounds`` rounds of Flower's strategy loop (``FederatedStrategy``, wrapped in
Flower's central-DP wrapper when ``federation.central_dp`` asks), then (``save-adapters``) the
finish, where every node applies its last download and saves its adapter.

Bad clients, as in the simulator (``asymlora.federated.validate``): every upload is checked
against the layout the client's own round-0 state fixes (names, shapes at its declared rank,
float dtype, finite values, ``federation.max_upload_norm``). A reply that fails the checks, an
error reply (the ClientApp raised) and no reply within ``timeout-s`` leave that client out of
the round, logged with the reason, the node and the client, and kept in ``rounds.jsonl``
(``rejected`` / ``dropped``). The round goes on with the rest when at least
``federation.min_clients`` uploads are left, and fails the run otherwise.

The run folder (``output_dir``) is claimed as ``asymlora federate`` claims its own
(``asymlora.runfolder``): locked for the run (a second run on it is refused at once), refused
when it holds a run unless ``overwrite-run`` is set (Flower runs cannot be resumed: every
client's state lives on its SuperNode for one run only), never touched when it holds anything
else, and written only once every client has joined (``config.yaml`` first).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common import log as flwr_log
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from ...errors import AsymloraError, one_line
from ...fedconfig import FederatedConfig, FederationConfig, save_config
from ...federated.common import Tensors
from ...federated.validate import Spec, UploadLimits, check_upload
from ...runfolder import RunFolder, folder_lock
from ..round import Member, Server, participants
from .accounting import CentralPrivacy, gaussian_epsilon, local_multiplier
from .config import AppSettings, federated_config
from .dp import with_central_dp, wrapper_reads_arrays
from .protocol import FINISH, INIT, TENSORS, from_record, message, sort_replies
from .strategy import FederatedStrategy, ScreenUploads


def warn(text: str) -> None:
    """A warning for the run's log: Flower's logger, which ``flwr run --stream`` shows."""
    flwr_log(logging.WARNING, text)


def info(text: str) -> None:
    flwr_log(logging.INFO, text)


# What the refusal of a run folder that holds a run adds to its message, and its hint.
NO_RESUME = (
    ", and Flower runs cannot be resumed (each client's state lives on its SuperNode for one run only)",
    "give overwrite-run=true (--run-config) to start it again, or another output_dir",
)


def exchange(
    grid: Grid, messages: Mapping[int, Message], timeout: float
) -> tuple[dict[int, Message], dict[int, str]]:
    """Send ``messages`` (client index -> message) and wait up to ``timeout`` s: the replies
    by client, and why each other client has none (no reply in time, or an error reply)."""
    replies = list(grid.send_and_receive(list(messages.values()), timeout=timeout))
    return sort_replies({i: m.metadata.dst_node_id for i, m in messages.items()}, replies, timeout)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of {count} SuperNodes connected after {timeout} s")
        time.sleep(1.0)


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
            info(f"init: client {members[i].label} uploads under local DP: {local_dp_line(meta)}")
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


def local_dp_line(meta: Mapping[str, Any]) -> str:
    """What a node under local DP said of its mod at the init, and the (ε, δ) of each of its
    uploads by the RDP accountant (the Gaussian mechanism, q = 1; see ``accounting``)."""
    clip, std, delta = float(meta["dp-clip"]), float(meta["dp-std"]), float(meta["dp-delta"])
    epsilon = gaussian_epsilon(local_multiplier(std, clip), delta)
    return (
        f"update clipped to {clip:g}, noise std {std:.4g} per value: (ε, δ) = ({epsilon:.4g}, {delta:g}) "
        "per round it uploads in (Gaussian mechanism, sensitivity 2 x the clip, RDP accountant)"
    )


def check_init(init: Mapping[str, Tensor], first: Mapping[str, Tensor]) -> str | None:
    """Why a client's initial tensors cannot fix its layout, or None: the same names as client
    0's, float and finite (shapes may differ with the rank)."""
    if set(init) != set(first):
        return f"tensor names differ from client 0's ({len(init)} against {len(first)})"
    return check_upload(
        init, {k: Spec(tuple(v.shape), first[k].dtype) for k, v in init.items()}, UploadLimits()
    )


def central_privacy(federation: FederationConfig, n: int, per_round: int) -> CentralPrivacy | None:
    """The run's central-DP account (None without central DP): ``per_round`` of ``n`` clients."""
    if not wrapper_reads_arrays(federation):
        return None
    return CentralPrivacy(federation.dp_noise_multiplier, n, per_round, federation.dp_delta)


def finish(grid: Grid, core: FederatedStrategy, rounds: int, timeout: float) -> None:
    """Every node with a pending download (or FLoRA merge) applies it and saves its adapter."""
    due = sorted(set(core.pending) | {i for i, m in core.merges.items() if m})
    msgs = {i: message(core.nodes[i], FINISH, rounds, core.pending.get(i), core.merges[i]) for i in due}
    _, failed = exchange(grid, msgs, timeout)
    for i, reason in sorted(failed.items()):
        warn(f"finish: client {core.server.members[i].label} did not save: {reason}")


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Claim the run folder, then run the federation (``serve``). An error the user can fix
    fails the run with its hint in the message, which is what Flower reports of a ServerApp."""
    cfg = federated_config(context.run_config)
    settings = AppSettings.of(context.run_config)
    try:
        with folder_lock(Path(cfg.output_dir), info, wait=False):
            folder = RunFolder.open(cfg, save_config, overwrite=settings.overwrite_run, held=NO_RESUME)
            serve(grid, cfg, settings, folder)
    except AsymloraError as err:
        err.args, err.hint = (one_line(str(err), err.hint),), ""
        raise


def serve(grid: Grid, cfg: FederatedConfig, settings: AppSettings, folder: RunFolder) -> None:
    """The init, ``federation.rounds`` rounds of the strategy loop, then the finish; writes
    ``config.yaml`` once the clients have joined and the server is set up, then
    ``server.safetensors`` and ``rounds.jsonl`` after every round."""
    method = cfg.federation.make_method()
    n = cfg.clients.count()  # the ranks were checked with the config (FederatedConfig)
    per_round = len(participants(n, cfg.federation.fraction, cfg.seed, 1))  # as many every round
    privacy = central_privacy(cfg.federation, n, per_round)  # before any work: needs dp-accounting

    started = time.monotonic()
    members, nodes, inits = join(grid, wait_for_nodes(grid, n, settings.timeout_s), cfg, settings.timeout_s)
    server = Server(
        method,
        members,
        fraction=cfg.federation.fraction,
        seed=cfg.seed,
        min_clients=cfg.federation.min_clients,
        limits=cfg.federation.limits(),
        warn=warn,
        equal_weights=cfg.federation.central_dp != "off",  # the wrappers' noise is for a plain mean
        wire=cfg.federation.wire(),
    )
    setups, wrapped = server.setup(inits), wrapper_reads_arrays(cfg.federation)
    core = FederatedStrategy(server, nodes, setups, folder.path, settings.timeout_s, wrapped, privacy)
    info(f"init: {n} clients joined in {time.monotonic() - started:.1f} s")
    strategy = with_central_dp(core, cfg.federation, per_round)
    if strategy is not core:  # validation before any wrapper sees the replies
        strategy = ScreenUploads(strategy, core)
    folder.start(0, info)
    rounds = cfg.federation.rounds
    result = strategy.start(grid, core.initial_arrays(), num_rounds=rounds, timeout=settings.timeout_s)
    core.take(result.arrays, rounds)
    if privacy is not None:
        info(privacy.summary())
    if settings.save_adapters:
        finish(grid, core, rounds, settings.timeout_s)
