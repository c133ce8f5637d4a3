"""The Flower app's protocol in one process: the real ``server_main`` and ``client_app`` talk
through a stand-in for Flower's Grid that hands each message to the ClientApp of its node (each
node with its own Context, kept across messages as a SuperNode keeps it). The stand-in can lose
a message (never delivered) or a reply (the node ran, the server never heard), which is what a
timeout looks like to the server; tests/test_flower.py covers the real transport.

A client whose round-2 message or reply is lost must end where the simulator's client that is
dropped in round 2 ends: its round-1 download still applied exactly once (FLoRA's merge is
additive, so applying it twice would show), its round-2 training discarded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flower_poison
from tiny_models import write_choice_tasks

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from asymlora.adapters import read_tensors  # noqa: E402
from asymlora.data.clients import build_clients  # noqa: E402
from asymlora.engines import flower as app  # noqa: E402
from asymlora.engines.local import LocalSimulator  # noqa: E402
from asymlora.models import load_model  # noqa: E402
from asymlora.recipes import federated as fed  # noqa: E402

ROUNDS = 3


class Grid:
    """Flower's Grid as ``server_main`` uses it (``get_node_ids``, ``send_and_receive``), with
    nodes in this process; ``lose[(node, round)]`` is ``"message"`` or ``"reply"``."""

    def __init__(self, run_config: dict, nodes: int, lose: dict[tuple[int, int], str]) -> None:
        self.contexts = {
            100 + k: Context(
                run_id=1,
                node_id=100 + k,
                node_config={"partition-id": k},
                state=RecordDict(),
                run_config=run_config,
            )
            for k in range(nodes)
        }
        self.lose = lose
        self.sent: list[tuple[int, str, int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node, rnd = msg.metadata.dst_node_id, int(msg.content["config"]["round"])
            self.sent.append((node, msg.metadata.message_type, rnd))
            lost = self.lose.get((node - 100, rnd)) if msg.metadata.message_type == "train" else None
            if lost == "message":
                continue
            msg.metadata.__dict__["_message_id"] = f"{len(self.sent):064x}"
            msg.metadata.__dict__["_src_node_id"] = 1
            try:
                reply = flower_poison.client_app(msg, self.contexts[node])
            except Exception as ex:  # what flwr-clientapp replies when the app raises
                reply = Message(Error(code=0, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)
            if lost != "reply":
                replies.append(reply)
        return replies


def run_config(method: str, tasks: list[str], out: Path, ranks: str = "") -> dict:
    return {
        "federation.method": method,
        "federation.rounds": ROUNDS,
        "model": "tiny-llama",
        "seed": 5,
        "clients.tasks": ",".join(tasks),
        "adapter.ranks": ranks,
        "output_dir": str(out),
        "adapter.r": 4,
        "adapter.dropout": 0.0,
        "train.steps": 1,
        "train.batch_size": 2,
        "train.lr": 1e-2,
        "num-threads": 1,
        "timeout-s": 5,
        "save-adapters": True,
        "test-poison": "",
    }


def simulate(config: dict, drop: tuple[int, int]) -> LocalSimulator:
    """The simulator for ``config``, where client ``drop[0]``'s training raises in round ``drop[1]``."""
    cfg = app.federated_config(config)
    base, tokenizer = load_model(cfg.model)
    clients = build_clients(cfg.clients)
    sim = fed.make_simulator(cfg, clients, base, tokenizer)
    train = sim.train_client

    def train_client(rnd: int, i: int):
        if (i, rnd) == drop:
            raise RuntimeError("dropped")
        return train(rnd, i)

    sim.train_client = train_client
    sim.records = []
    for _ in range(ROUNDS):
        sim.records.append(sim.aggregator.record(sim.run_round(), sim.records))
    return sim


def assert_same_records(out: Path, sim: LocalSimulator) -> None:
    """rounds.jsonl from Flower holds the simulator's records, field by field (the loss up to
    float rounding: under FLoRA a Flower client's base is W0 + sum of merges, the simulator's a
    running sum)."""
    lines = [json.loads(line) for line in (out / app.ROUNDS_FILE).read_text().splitlines()]
    assert len(lines) == len(sim.records)
    for line, record in zip(lines, sim.records, strict=True):
        assert line.keys() == record.keys()
        for key in record:
            if key == "loss":
                assert line[key] == pytest.approx(record[key], abs=1e-5)
            elif key != "dropped":  # the same clients, for another reason (no reply / an error)
                assert line[key] == record[key], key
        assert line["dropped"].keys() == record["dropped"].keys()


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are stamped with the task's run id, which flwr keeps per process."""
    saved = {k: getattr(TaskIdentity, f"_{k}", None) for k in ("run_id", "task_id", "node_id")}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    torch.set_num_threads(1)
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, f"_{k}", v)


@pytest.mark.parametrize(
    ("method", "ranks", "lost"),
    [("fedalora", "", "message"), ("fedalora", "", "reply"), ("flora", "4,2,2", "reply")],
)
def test_a_lost_message_or_reply_drops_the_client_like_the_simulator(
    tmp_path: Path, method: str, ranks: str, lost: str
) -> None:
    tasks = write_choice_tasks(tmp_path / "tasks", 3, 6)
    config = run_config(method, tasks, tmp_path / "out", ranks)
    grid = Grid(config, 3, {(1, 2): lost})
    app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))

    sim = simulate(config, (1, 2))
    got = read_tensors(tmp_path / "out" / app.SERVER_FILE)
    assert sorted(got) == sorted(sim.server)
    for k, v in sim.server.items():
        torch.testing.assert_close(got[k], v, atol=1e-5 if method == "flora" else 1e-6, rtol=0)
    lines = (tmp_path / "out" / app.ROUNDS_FILE).read_text().splitlines()
    assert '"dropped": {"task1": "no reply within 5 s"}' in lines[1]
    assert_same_records(tmp_path / "out", sim)
    # every client's final state, as saved at the finish, equals the simulator's
    for i in range(3):
        state = app.from_record(grid.contexts[100 + i].state[app.STATE])
        for k, v in sim.states[i].items():
            torch.testing.assert_close(state[k], v, atol=1e-5 if method == "flora" else 1e-6, rtol=0)


@pytest.mark.parametrize(("method", "ranks"), [("fedalora", ""), ("flora", "4,2,2,2")])
def test_partial_participation_matches_the_simulator(tmp_path: Path, method: str, ranks: str) -> None:
    """fraction 0.5 of 4 clients: who sits out a round gets its download later (and, under
    FLoRA, the merges of the rounds it missed), as the simulator's clients do."""
    tasks = write_choice_tasks(tmp_path / "tasks", 4, 6)
    config = run_config(method, tasks, tmp_path / "out", ranks)
    config["federation.fraction"] = 0.5
    grid = Grid(config, 4, {})
    app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))

    sim = simulate(config, (-1, -1))
    got = read_tensors(tmp_path / "out" / app.SERVER_FILE)
    tolerance = 1e-5 if method == "flora" else 1e-6
    for k, v in sim.server.items():
        torch.testing.assert_close(got[k], v, atol=tolerance, rtol=0)
    assert len([s for s in grid.sent if s[1] == "train"]) == 2 * ROUNDS  # 2 of 4 per round
    assert_same_records(tmp_path / "out", sim)
    for i in range(4):
        state = app.from_record(grid.contexts[100 + i].state[app.STATE])
        for k, v in sim.states[i].items():
            torch.testing.assert_close(state[k], v, atol=tolerance, rtol=0)


def test_a_node_outside_the_run_sits_it_out(tmp_path: Path) -> None:
    """3 clients on 4 nodes: the node with partition-id 3 answers the init with an error and
    gets no other message; the run equals the simulator's."""
    tasks = write_choice_tasks(tmp_path / "tasks", 3, 6)
    config = run_config("fedalora", tasks, tmp_path / "out") | {
        "federation.rounds": 1,
        "save-adapters": False,
    }
    grid = Grid(config, 4, {})
    app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    assert [kind for node, kind, _ in grid.sent if node == 103] == ["query.init"]
    cfg = app.federated_config(config)
    base, tokenizer = load_model(cfg.model)
    sim = fed.make_simulator(cfg, build_clients(cfg.clients), base, tokenizer)
    sim.run_round()
    got = read_tensors(tmp_path / "out" / app.SERVER_FILE)
    for k, v in sim.server.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("method", "ranks", "wire"), [("fedalora", "", "bfloat16"), ("flora", "4,2,2", "float16")]
)
def test_a_wire_dtype_travels_over_flower_as_in_the_simulator(
    tmp_path: Path, method: str, ranks: str, wire: str
) -> None:
    """Uploads and downloads in bfloat16 (which Flower's numpy arrays cannot hold: sent as raw
    2-byte values) or float16: the same server state, records and 2-byte counts as the
    simulator with the same wire dtype."""
    tasks = write_choice_tasks(tmp_path / "tasks", 3, 6)
    config = run_config(method, tasks, tmp_path / "out", ranks) | {"federation.wire_dtype": wire}
    grid = Grid(config, 3, {})
    app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    sim = simulate(config, (-1, -1))
    got = read_tensors(tmp_path / "out" / app.SERVER_FILE)
    for k, v in sim.server.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v, atol=1e-5 if method == "flora" else 1e-6, rtol=0)
    assert_same_records(tmp_path / "out", sim)
    for comm in sim.records[0]["comm"].values():
        assert comm["bytes_up"] == 2 * comm["params_up"] and comm["bytes_down"] == 2 * comm["params_down"]
