"""The Flower app's protocol in one process: the real ``server_main`` and ``client_app`` talk
through a stand-in for Flower's Grid that hands each message to the ClientApp of its node (each
node with its own Context, kept across messages as a SuperNode keeps it). The stand-in can lose
a message (never delivered) or a reply (the node ran, the server never heard), which is what a
timeout looks like to the server; tests/test_flower.py covers the real transport.

A client whose round-2 message or reply is lost must end where the simulator's client that is
dropped in round 2 ends: its round-1 download still applied exactly once (FLoRA's merge is
additive, so applying it twice would show), its round-2 training discarded."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

import flower_poison
from tiny_models import write_choice_tasks

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from asymlora.adapters import read_tensors  # noqa: E402
from asymlora.adapters.io import WEIGHTS_FILE  # noqa: E402
from asymlora.data.clients import build_clients  # noqa: E402
from asymlora.engines import flower as app  # noqa: E402
from asymlora.engines.flower.client_app import ROUND0  # noqa: E402
from asymlora.engines.flower.protocol import upload_of  # noqa: E402
from asymlora.engines.local import LocalSimulator  # noqa: E402
from asymlora.errors import RunFolderError  # noqa: E402
from asymlora.models import load_model  # noqa: E402
from asymlora.recipes import federated as fed  # noqa: E402
from asymlora.runfolder import CONFIG_FILE  # noqa: E402

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
    base, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
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


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_a_packed_record_keeps_every_tensor_bit_for_bit() -> None:
    """``packed`` (how tensors travel and stay in a node's Context): names, order, dtypes,
    shapes and every bit (-0.0, NaN payloads, bfloat16) come back, in tensors of their own."""
    tensors = {
        "layers.10.q_proj.lora_A": torch.randn(3, 5),
        "layers.2.q_proj.lora_A": torch.tensor([-0.0, float("nan"), float("inf")]),
        "bf16": torch.randn(4, 3).to(torch.bfloat16),
        "half": torch.randn(3).half(),  # 6 bytes: the next tensor starts unaligned in the buffer
        "double": torch.randn(2, 2).double(),
        "ints": torch.arange(5),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 3).t(),
    }
    record = app.packed(tensors)
    assert len(record) == 1  # one Array, one buffer
    got = app.from_record(record)
    assert list(got) == list(tensors)
    for k, v in tensors.items():
        assert (got[k].dtype, got[k].shape, raw_bytes(got[k])) == (v.dtype, v.shape, raw_bytes(v)), k
    got["scalar"].add_(1)  # writable, and not shared with the record or another tensor
    assert float(app.from_record(record)["scalar"]) == 2.5


def garbled(how: str) -> object:
    """A packed record whose buffer ``how`` says is damaged."""
    from flwr.app import Array, ArrayRecord

    record = app.packed({"a.lora_B": torch.ones(2, 3), "b.lora_B": torch.ones(4)})
    data = next(iter(record.values())).data
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if how == "short":
        data = data[:-4]
    elif how == "long":
        data = data + b"\0" * 4
    else:
        header[0][1:] = {"dtype": ["load", [2, 3]], "shape": ["float32", [2, -3]]}[how]
        head = json.dumps(header).encode()
        data = len(head).to_bytes(8, "little") + head + data[8 + size :]
    return ArrayRecord({app.PACKED: Array(dtype="uint8", shape=(len(data),), stype=app.PACKED, data=data)})


@pytest.mark.parametrize("how", ["short", "long", "dtype", "shape"])
def test_a_damaged_packed_upload_is_a_refused_upload_not_a_crash(how: str) -> None:
    with pytest.raises(ValueError, match="packed record"):
        app.from_record(garbled(how))
    reply = Message(RecordDict({app.UPLOAD: garbled(how)}), reply_to=app.message(100, "train", 1))
    assert upload_of(reply) is None  # what the server's validation rejects


def test_a_node_keeps_only_the_round0_parts_its_method_reads(tmp_path: Path) -> None:
    """After a run, a fedalora node's Context holds no round-0 tensors (its download replaces
    B, and A is its own); a FLoRA node's holds its round-0 A and B (it restarts from them)."""
    for method, ranks, parts in (("fedalora", "", set()), ("flora", "4,2", {"lora_A", "lora_B"})):
        tasks = write_choice_tasks(tmp_path / method / "tasks", 2, 6)
        config = run_config(method, tasks, tmp_path / method / "out", ranks) | {"federation.rounds": 1}
        grid = Grid(config, 2, {})
        app.server_main(
            grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
        )
        for context in grid.contexts.values():
            kept = app.from_record(context.state[ROUND0])
            assert {k.rpartition(".")[2] for k in kept} == parts
            assert app.TRAINED not in context.state  # the finish answered the last training


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


def serve(config: dict, grid: Grid) -> None:
    app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p): (p.read_bytes() if p.is_file() else b"", p.stat().st_mode) for p in sorted(folder.rglob("*"))
    }


class NanLossGrid(Grid):
    """The Grid, where node 100 reports its training loss as NaN (its upload is sound)."""

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            if reply.metadata.src_node_id == 100 and "metrics" in reply.content:
                reply.content["metrics"] = MetricRecord({"loss": float("nan")})
        return replies


def test_the_run_folder_is_claimed_as_federate_claims_its_own(tmp_path: Path) -> None:
    """The ServerApp's run folder: config.yaml; rounds.jsonl in standard JSON (a NaN loss is
    null); every file with the user's umask. Run again into it: refused without writing, since a
    Flower run cannot be resumed, unless overwrite-run, which starts it again from nothing; a
    folder in use by another process is refused at once, one holding anything else never touched."""
    tasks = write_choice_tasks(tmp_path / "tasks", 2, 6)
    out = tmp_path / "out"
    config = run_config("fedalora", tasks, out) | {"federation.rounds": 1}
    old = os.umask(0o027)
    try:
        serve(config, NanLossGrid(config, 2, {}))
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {CONFIG_FILE, app.SERVER_FILE, app.ROUNDS_FILE, WEIGHTS_FILE}
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in files), [(p, oct(p.stat().st_mode)) for p in files]
    (line,) = (out / app.ROUNDS_FILE).read_text().splitlines()
    record = json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in rounds.jsonl"))
    assert record["loss"]["task0"] is None and record["loss"]["task1"] > 0
    assert app.federated_config(config) == fed.load_config(out / CONFIG_FILE)
    first = read_tensors(out / app.SERVER_FILE)

    before, grid = snapshot(out), Grid(config, 2, {})
    with pytest.raises(
        RunFolderError, match="holds a run already, and Flower runs cannot be resumed.*overwrite-run=true"
    ):
        serve(config, grid)
    assert snapshot(out) == before and grid.sent == []
    with open(tmp_path / ".out.lock", "w") as held:  # what another process's lock looks like
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunFolderError, match="in use by another asymlora process"):
            serve(config | {"overwrite-run": True}, grid)
    assert snapshot(out) == before and grid.sent == []

    (out / "stale.txt").write_text("from before")
    serve(config | {"overwrite-run": True}, Grid(config, 2, {}))  # from nothing: the same run again
    assert (
        not (out / "stale.txt").exists()
        and json.loads((out / app.ROUNDS_FILE).read_text())["loss"]["task0"] > 0
    )
    again = read_tensors(out / app.SERVER_FILE)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="holds no asymlora run"):
        serve(config | {"output_dir": str(mine), "overwrite-run": True}, grid)
    assert (mine / "notes.txt").read_text() == "mine" and grid.sent == []
    with pytest.raises(fed.ConfigError, match="overwrite-run='false': expected true or false"):
        serve(config | {"overwrite-run": "false"}, grid)


def test_the_client_app_trains_on_the_base_in_the_configs_dtype(tmp_path: Path) -> None:
    """dtype=bfloat16: every node's base model is bfloat16 and the run equals the simulator's
    on a bfloat16 base; a float32 run in the same process still gets a float32 base (the
    process's base-model cache is keyed by dtype)."""
    tasks = write_choice_tasks(tmp_path / "tasks", 2, 6)
    config = run_config("fedalora", tasks, tmp_path / "out") | {"federation.rounds": 1, "dtype": "bfloat16"}
    grid = Grid(config, 2, {})
    serve(config, grid)
    cfg = app.federated_config(config)
    base, tokenizer = load_model(cfg.model, dtype=torch.bfloat16)
    sim = fed.make_simulator(cfg, build_clients(cfg.clients), base, tokenizer)
    sim.run_round()
    got = read_tensors(tmp_path / "out" / app.SERVER_FILE)
    for k, v in sim.server.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)

    def base_dtypes(context: Context) -> set[torch.dtype]:
        node = app.Node.from_context(context)
        model = node.model(app.from_record(context.state[app.STATE]))
        return {layer.base_layer.weight.dtype for layer in model.adapted.values()}

    assert base_dtypes(grid.contexts[100]) == base_dtypes(grid.contexts[101]) == {torch.bfloat16}
    float32 = config | {"dtype": "float32", "output_dir": str(tmp_path / "out32")}
    grid32 = Grid(float32, 2, {})
    serve(float32, grid32)
    assert base_dtypes(grid32.contexts[100]) == {torch.float32}
