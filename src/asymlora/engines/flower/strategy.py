"""asymlora's round as a Flower ``Strategy`` (``configure_train`` / ``aggregate_train``), started
with ``strategy.start(...)`` as Flower's own apps are; the server's side of the round is
``engines.round.Server``, the same object the simulator calls.

Flower's strategy loop passes one ArrayRecord from round to round, the global arrays: here the
method's server state (in sorted key order). For an averaging method (``not_an_average`` is
None) that state is also every participant's download, so a wrapper that changes the arrays
(Flower's central-DP wrappers add noise to them) changes what the clients receive: the arrays
handed to the next ``configure_train`` are taken as the server state and as the downloads of
the round before (``take``). Round 1 starts from the common starting point of the uploaded
parts (what setup made common), the point a DP wrapper measures round 1's updates from.

Validation is the server's first step (``screen``): a lost reply, an error reply and an upload
the validator refuses leave that client out of the round before anything else sees the
replies. Flower's DP wrappers skip a whole round when one reply is an error and cannot clip a
malformed upload, so where a wrapper sits between, ``ScreenUploads`` is put outermost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log as flwr_log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ...adapters.io import atomic_write, write_tensors
from ...federated.common import BASE_DELTA, Tensors, select
from ...runfolder import write_jsonl
from ..round import RoundLog, Server, from_wire, to_wire
from .accounting import CentralPrivacy
from .protocol import (
    DOWNLOAD,
    ROUNDS_FILE,
    SERVER_FILE,
    SETUP,
    UPLOAD,
    Pending,
    as_record,
    from_record,
    loss_of,
    message,
    sort_replies,
    upload_of,
)


class FederatedStrategy(Strategy):
    """The federation's rounds as a Flower strategy: ``server`` (the round's server side, set
    up), ``nodes[i]`` client i's node id, ``setups[i]`` its round-0 state, ``out`` the run
    folder (``server.safetensors`` and ``rounds.jsonl``, written after every round), ``timeout``
    the seconds the loop waits for replies, ``wrapped`` whether a Flower wrapper sits around
    it (one reads and may change the loop's arrays and the replies: then the arrays are Flower's
    own, one per tensor, and what the wrapper hands on is read back), ``privacy`` the central-DP
    account whose (ε, δ) after each round goes into that round's line of ``rounds.jsonl``."""

    def __init__(
        self,
        server: Server,
        nodes: list[int],
        setups: list[Tensors],
        out: Path,
        timeout: float,
        wrapped: bool = False,
        privacy: CentralPrivacy | None = None,
    ):
        self.server, self.method, self.nodes, self.setups = server, server.method, nodes, setups
        self.out, self.timeout, self.wrapped, self.privacy = out, timeout, wrapped, privacy
        self.averaging = self.method.not_an_average is None
        # what each client is due next: setup's parts, then the download of its last round
        self.pending: dict[int, Pending] = {i: (SETUP, s, 0) for i, s in enumerate(setups)}
        # FLoRA: a round's merge reaches every client, also those left out of the round (as the
        # simulator's one shared base does); kept per client and round until the client confirms.
        self.merges: dict[int, dict[int, Tensors]] = {i: {} for i in range(len(nodes))}
        self.records: list[dict] = []
        self.sent: dict[int, Pending | None] = {}  # this round's participants and what they got
        self.log: RoundLog | None = None  # this round's accepted clients, once screened
        self.accepted: list[Tensors] = []  # and their uploads, as screened
        self.started = time.monotonic()

    def initial_arrays(self) -> ArrayRecord:
        """The arrays the loop starts from: the uploaded parts' common starting point for an
        averaging method, the server state after setup otherwise."""
        start = self.method.upload(self.setups[0]) if self.averaging else self.server.state
        return as_record(start, self.wrapped)

    # --- Flower's Strategy ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's participants' train messages, each with its pending setup or download
        (and ``config``, the wrappers' settings, such as a clipping norm)."""
        if server_round > 1:
            self.take(arrays, server_round - 1)
        self.started = time.monotonic()
        self.log = None
        self.sent = {i: self.pending.pop(i, None) for i in self.server.participants(server_round)}
        return [
            message(self.nodes[i], MessageType.TRAIN, server_round, sent, self.merges[i], dict(config))
            for i, sent in self.sent.items()
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The method's aggregation of the accepted uploads (as the replies carry them now,
        after any wrapper's clipping); records the round and writes the run folder's files."""
        replies = list(replies)
        if self.log is None or self.log.round != server_round:  # no wrapper screened them first
            self.screen(server_round, replies)
            uploads = self.accepted
        else:  # as the wrapper left them
            by_node = {r.metadata.src_node_id: r for r in replies}
            uploads = [from_record(by_node[self.nodes[i]].content[UPLOAD]) for i in self.log.participants]
        log = self.server.combine(self.log, uploads)
        self.pending |= {
            i: (DOWNLOAD, d, server_round) for i, d in zip(log.participants, log.downloads, strict=True)
        }
        if self.method.merges_into_base:
            download = from_wire(log.downloads[0])  # one download, the same for every client
            for i in set(range(len(self.nodes))) - set(log.participants):
                merged = self.method.apply_download(self.setups[i], download, self.setups[i])
                self.merges[i][server_round] = select(merged, {BASE_DELTA})
        record = self.server.record(log, self.records)
        if self.privacy is not None:  # the wrapper noises what this returns: one more release
            record |= self.privacy.spend(len(log.participants))
        self.records.append(record)
        self.write()
        record = self.records[-1]
        print(
            f"round {server_round}: {record['bytes_up']:,.0f} B up / {record['bytes_down']:,.0f} B down "
            f"per client, {time.monotonic() - self.started:.2f} s"
        )
        return as_record(self.server.state, self.wrapped), MetricRecord({"loss": fmean(log.loss)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # no federated evaluation during the run (docs/flower.md)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        flwr_log(20, f"\t├──> asymlora {self.method.name}: {len(self.nodes)} clients")

    # --- the round's bookkeeping ------------------------------------------------------------
    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Validation, the server's first step: the participants' replies that are accepted,
        in participant order. A client without a reply or with an error reply is dropped (and
        sent its pending download again next time: it may not have applied it); one whose
        upload fails validation is rejected. Raises ``RoundError`` with too few left."""
        got, failed = sort_replies({i: self.nodes[i] for i in self.sent}, replies, self.timeout)
        for i, sent in self.sent.items():
            if i in failed:  # the node may not have applied what it was sent: send it again
                if sent is not None and i not in self.pending:
                    self.pending[i] = sent
            else:
                self.merges[i] = {}
        uploads = [(i, upload_of(reply)) for i, reply in got.items()]
        losses = {i: loss_of(reply) for i, reply in got.items()}
        self.log, self.accepted = self.server.accept(server_round, uploads, losses, sorted(failed.items()))
        return [got[i] for i in self.log.participants]

    def take(self, arrays: ArrayRecord, answered: int) -> None:
        """An averaging method's server state and round ``answered``'s downloads are the loop's
        arrays (the aggregate, as the wrappers left it; without a wrapper they are both already)."""
        if not self.averaging or answered < 1 or not self.wrapped:
            return
        state = from_record(arrays)
        self.server.state = state
        download = to_wire(state, self.server.wire)
        for i, (kind, _, answers) in list(self.pending.items()):
            if kind == DOWNLOAD and answers == answered:
                self.pending[i] = (kind, download, answers)
        self.write()

    def write(self) -> None:
        """``server.safetensors`` (the server state) and ``rounds.jsonl`` (every round so far, as
        standard JSON: a NaN loss is null), each replaced whole."""
        atomic_write(self.out / SERVER_FILE, lambda tmp: write_tensors(self.server.state, tmp))
        write_jsonl(self.out / ROUNDS_FILE, self.records)


class ScreenUploads(Strategy):
    """``strategy`` (a wrapper around ``core``) with ``core``'s validation first: the wrapped
    strategies only ever see the accepted replies."""

    def __init__(self, strategy: Strategy, core: FederatedStrategy):
        self.strategy, self.core = strategy, core

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, self.core.screen(server_round, replies))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
