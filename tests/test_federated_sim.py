"""The federated simulator and recipe on tiny-llama with tiny local tasks: what each method keeps
and shares, exact communication, heterogeneous ranks, FLoRA's shared-base merge, kill/resume bit
for bit, the combined ALoRA view, PEFT export, config errors, the Dirichlet split."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from asymlora.adapters import AdapterConfig, load_adapter, read_tensors
from asymlora.adapters.targets import layer_dims
from asymlora.config import ConfigError
from asymlora.data.clients import ClientsConfig, build_clients
from asymlora.data.partition import dirichlet_split
from asymlora.engines import Client, LocalSimulator, participants
from asymlora.errors import InputError
from asymlora.federated import METHODS, count, get_method
from asymlora.federated.comm import per_client
from asymlora.federated.common import BASE_DELTA, A, B, part, select
from asymlora.models import load_model
from asymlora.recipes import federated as fed
from asymlora.train import Example, TrainConfig, encode_tasks, pad_id_of
from tiny_models import write_choice_tasks

TARGETS = {"tiny-llama": ["q_proj", "v_proj"], "tiny-gpt2": ["c_attn"]}
HET_RANKS = [4, 2, 2]


class Crash(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls run several times faster on one thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- helpers ------------------------------------------------------------------------------------
def write_tasks(folder: Path, n: int = 3, size: int = 10) -> list[str]:
    return write_choice_tasks(folder, n, size)


def engine_clients(tokenizer, ranks: list[int]) -> list[Client]:
    data = [[Example(f"c{i} {j}+{j}=", f" {2 * j + i}", 0) for j in range(6 + i)] for i in range(len(ranks))]
    return [
        Client(f"c{i}", encode_tasks(tokenizer, [d], 64), r, 2.0 * r)
        for i, (d, r) in enumerate(zip(data, ranks, strict=True))
    ]


def simulator(method: str, ranks: list[int], model: str = "tiny-llama", **options) -> LocalSimulator:
    base, tokenizer = load_model(model)
    return LocalSimulator(
        base,
        get_method(method, **options),
        engine_clients(tokenizer, ranks),
        AdapterConfig(method="lora", target_modules=TARGETS[model], d_m=4, dropout=0.1),
        TrainConfig(steps=1, batch_size=2, lr=1e-2),
        seed=5,
        pad_id=pad_id_of(tokenizer),
    )


def run_config(out: Path, tasks: list[str], method: str = "fedalora", **sections) -> fed.FederatedConfig:
    data = {
        "model": "tiny-llama",
        "output_dir": str(out),
        "seed": 3,
        "federation": {"method": method, "rounds": 2},
        "adapter": {"r": 4, "d_m": 4, "dropout": 0.1},
        "clients": {"tasks": tasks},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-2},
        "eval": {"limit": 2, "batch_size": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return fed.load_config(base=data)


def ids() -> torch.Tensor:
    return torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids(), **kw).logits


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> list[str]:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def fedalora_run(tmp_path_factory, task_files) -> Path:
    out = tmp_path_factory.mktemp("fedalora")
    fed.run(run_config(out, task_files), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def flora_run(tmp_path_factory, task_files) -> Path:
    out = tmp_path_factory.mktemp("flora")
    fed.run(run_config(out, task_files, "flora", adapter={"ranks": HET_RANKS}), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def het_run(tmp_path_factory, task_files) -> Path:
    out = tmp_path_factory.mktemp("het")
    cfg = run_config(out, task_files, "fedalora-het", adapter={"ranks": HET_RANKS}, federation={"rounds": 1})
    fed.run(cfg, log=lambda _: None)
    return out


# --- what is kept and what is shared ------------------------------------------------------------
def test_fedalora_a_changes_only_in_local_training_and_b_is_shared():
    sim = simulator("fedalora", [4, 4, 4])
    first_a = [select(s, {A}) for s in sim.states]
    trained: dict[int, dict] = {}

    def remember_a(rnd: int, i: int, history: list) -> None:
        trained[i] = select(sim.states[i], {A})

    for _ in range(2):
        sim.run_round(on_client=remember_a)
        for i, state in enumerate(sim.states):
            for key, a in select(state, {A}).items():
                assert torch.equal(a, trained[i][key]), "A changed outside local training"
            for key, b in select(state, {B}).items():
                assert torch.equal(b, sim.states[0][key]), "B differs between clients after a round"
                assert b.abs().sum() > 0
    for i, state in enumerate(sim.states):  # B starts at 0, so A moves from round 2 on
        assert all(not torch.equal(a, first_a[i][k]) for k, a in select(state, {A}).items())
    key = next(iter(first_a[0]))
    assert not torch.equal(sim.states[0][key], sim.states[1][key]), "clients' A's come from one draw"


@pytest.mark.parametrize("method", list(METHODS))
def test_round_comm_is_what_the_dicts_hold_and_the_shape_formula(method, monkeypatch):
    ranks = HET_RANKS if METHODS[method].heterogeneous else [4, 4, 4]
    sim = simulator(method, ranks)
    sent: list = []
    original = type(sim.method).aggregate

    def recording(self, uploads, weights, server, scales=None):
        new_server, downloads = original(self, uploads, weights, server, scales)
        sent.append((list(uploads), downloads))
        return new_server, downloads

    monkeypatch.setattr(type(sim.method), "aggregate", recording)
    log = sim.run_round()
    uploads, downloads = sent[0]
    dims = {name: layer_dims(m) for name, m in sim.base_layers.items()}
    formula = per_client(sim.method, dims, ranks, d_m=4)
    for j, comm in enumerate(log.comm):
        (pu, bu), (pd, bd) = count(uploads[j]), count(downloads[j])
        assert comm == {"params_up": pu, "bytes_up": bu, "params_down": pd, "bytes_down": bd}
        assert (comm["params_up"], comm["params_down"]) == formula[j]
        assert comm["bytes_up"] == 4 * comm["params_up"], "fp32 adapters send 4 bytes per parameter"
    for up in uploads:
        assert not {part(k) for k in up} & sim.method.local, "a local part was uploaded"


@pytest.mark.parametrize(
    ("method", "wire", "size"), [("fedalora", torch.bfloat16, 2), ("flexlora", torch.float16, 2)]
)
def test_a_wire_dtype_halves_the_bytes_and_the_server_aggregates_in_float32(method, wire, size, monkeypatch):
    """Uploads and downloads travel in the wire dtype (checked in it, counted in it); the server
    aggregates the received values in float32, and the clients keep float32 states."""
    ranks = HET_RANKS if METHODS[method].heterogeneous else [4, 4, 4]
    base, tokenizer = load_model("tiny-llama")
    sim = LocalSimulator(
        base,
        get_method(method),
        engine_clients(tokenizer, ranks),
        AdapterConfig(method="lora", target_modules=TARGETS["tiny-llama"], d_m=4, dropout=0.1),
        TrainConfig(steps=1, batch_size=2, lr=1e-2),
        seed=5,
        pad_id=pad_id_of(tokenizer),
        wire=wire,
    )
    sent: list = []
    original = type(sim.method).aggregate

    def recording(self, uploads, weights, server, scales=None):
        sent.append([dict(up) for up in uploads])
        return original(self, uploads, weights, server, scales)

    monkeypatch.setattr(type(sim.method), "aggregate", recording)
    log = sim.run_round()
    for comm in log.comm:
        assert (
            comm["bytes_up"] == size * comm["params_up"] and comm["bytes_down"] == size * comm["params_down"]
        )
    received = sent[0]
    assert all(v.dtype == torch.float32 for up in received for v in up.values()), "aggregated in float32"
    for up in received:  # what arrived holds only values of the wire dtype
        assert all(torch.equal(v, v.to(wire).float()) for v in up.values())
    assert all(v.dtype == torch.float32 for state in sim.states for v in state.values())
    assert all(v.dtype == torch.float32 for v in sim.server.values())


GLOBAL_KINDS = {
    "fedit": "adapter",
    "ffa": "adapter",
    "zeropad": "adapter",
    "flexlora": "dense",
    "flora": "base",
    "fedsa": None,
    "fedalora": None,
    "fedalora-het": None,
}


@pytest.mark.parametrize("method", list(METHODS))
def test_global_model_where_the_method_has_one(method):
    sim = simulator(method, HET_RANKS if METHODS[method].heterogeneous else [4, 4, 4])
    assert sim.global_kind() is None, "no global model before the first round"
    for _ in range(2):  # B starts at 0: untrained-A mistakes show from round 2
        sim.run_round()
    assert sim.global_kind() == GLOBAL_KINDS[method]
    if GLOBAL_KINDS[method] is None:
        with pytest.raises(ValueError, match="no global model"), sim.use_global():
            pass
        return
    weights = {name: layer.weight.clone() for name, layer in sim.base_layers.items()}
    with sim.use_global() as model:
        global_logits = logits(model)
    assert all(torch.equal(layer.weight, weights[n]) for n, layer in sim.base_layers.items())
    client_logits = logits(sim.load_client(0))  # client 0 has the largest rank
    if method == "flexlora":  # client 0 holds a rank-4 truncation of the rank-8 average
        assert not torch.allclose(global_logits, client_logits)
    else:  # after the download every client holds (its cut of) the global model
        assert (global_logits - client_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["fedalora-het", "zeropad"])
def test_heterogeneous_ranks_keep_each_clients_rank(method):
    sim = simulator(method, HET_RANKS)
    for _ in range(2):
        sim.run_round()
    for state, rank in zip(sim.states, HET_RANKS, strict=True):
        assert {v.shape[0] for k, v in state.items() if part(k) == A} == {rank}
    if method == "zeropad":
        with sim.use_global() as model:
            assert model.adapter_config.r == max(HET_RANKS)


def test_fedalora_het_common_start_on_a_real_model_is_one_draw_sliced_by_rank():
    """On a real (tiny) model the common start's A of every client is its rank's leading rows of
    the rank-4 client's draw, and training then moves each client's A on its own (from round 2:
    in round 1, B_base and B2 are zero, so A gets no gradient)."""
    sim = simulator("fedalora-het", HET_RANKS, client_a_init="common")
    first = [select(s, {A}) for s in sim.states]
    for state, rank in zip(first, HET_RANKS, strict=True):
        for key, a in state.items():
            assert torch.equal(a, first[0][key][:rank])
    sim.run_round()
    sim.run_round()
    for i, state in enumerate(sim.states):
        for key, a in select(state, {A}).items():
            assert not torch.equal(a, first[i][key])


def test_homogeneous_method_refuses_unequal_ranks():
    with pytest.raises(ValueError, match="same rank"):
        simulator("fedalora", HET_RANKS)


# --- FLoRA: one shared base ---------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_flora_shared_base_merge_equals_the_per_client_formula(model, monkeypatch):
    sim = simulator("flora", HET_RANKS, model=model)
    downloads: list = []
    original = type(sim.method).aggregate

    def recording(self, uploads, weights, server, scales=None):
        new_server, downs = original(self, uploads, weights, server, scales)
        downloads.append(downs)
        return new_server, downs

    monkeypatch.setattr(type(sim.method), "aggregate", recording)
    for _ in range(2):
        sim.run_round()
    assert not any(part(k) == BASE_DELTA for s in sim.states for k in s), "no per-client dense copy"
    for i in range(len(sim.clients)):
        # The method's own per-client formula: the client accumulates base_delta in its state.
        state = dict(sim.inits[i])
        for downs in downloads:
            state = sim.method.apply_download(state, downs[i], sim.inits[i])
        fresh, _ = load_model(model)
        with torch.no_grad():
            for key, delta in select(state, {BASE_DELTA}).items():
                layer = fresh.get_submodule(key.rsplit(".", 1)[0])
                layer.weight.add_(delta.T if type(layer).__name__ == "Conv1D" else delta)
        reference = load_adapter_state(fresh, sim, i)
        diff = (logits(reference) - logits(sim.load_client(i))).abs().max()
        assert state[next(k for k in state if part(k) == BASE_DELTA)].abs().max() > 0
        assert diff <= 1e-5, f"client {i}: {diff}"


def load_adapter_state(base, sim: LocalSimulator, i: int):
    from asymlora.adapters import wrap

    model = wrap(base, sim.load_client(i).adapter_config)
    model.load_adapter_state_dict(sim.states[i])
    return model


# --- the recipe: outputs, resume, views ---------------------------------------------------------
def test_run_folder_has_every_output(fedalora_run):
    for name in (
        "config.yaml",
        "rounds.jsonl",
        "clients.json",
        "results.json",
        "results.md",
        "server.safetensors",
    ):
        assert (fedalora_run / name).is_file(), name
    for name in ("score_per_client.png", "score_vs_round.png", "bytes_vs_score.png"):
        assert (fedalora_run / "plots" / name).stat().st_size > 0
    rounds = [json.loads(line) for line in (fedalora_run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(set(r["scores"]) == {"task0", "task1", "task2"} for r in rounds)
    results = json.loads((fedalora_run / "results.json").read_text())
    assert results["global_model"] is None and results["global_scores"] is None
    assert results["bytes_up_per_client_round"] == results["bytes_down_per_client_round"] > 0
    clients = json.loads((fedalora_run / "clients.json").read_text())
    assert [c["train_examples"] for c in clients] == [8, 8, 8]
    assert fed.load_config(fedalora_run / "config.yaml") == run_config(
        fedalora_run, clients_tasks(fedalora_run)
    )


def clients_tasks(run: Path) -> list[str]:
    return fed.load_config(run / "config.yaml").clients.tasks


@pytest.mark.parametrize("method", ["fedalora", "flora"])
def test_resume_after_a_crash_mid_round_ends_bit_for_bit_equal(method, request, task_files, tmp_path):
    straight = request.getfixturevalue(f"{method}_run")

    def crash(rnd, client, _):
        if (rnd, client) == (2, 1):
            raise Crash

    cfg = run_config(tmp_path / "resumed", task_files, method)
    cfg.adapter = fed.load_config(straight / "config.yaml").adapter
    with pytest.raises(Crash):
        fed.run(cfg, log=lambda _: None, on_client=crash)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["round"] == 1
    fed.run(cfg, resume=True, log=lambda _: None)
    for name in ("adapters/task0", "adapters/task1", "adapters/task2"):
        got = read_tensors(tmp_path / "resumed" / name / "adapter_model.safetensors")
        want = read_tensors(straight / name / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    got, want = (
        read_tensors(tmp_path / "resumed" / "server.safetensors"),
        read_tensors(straight / "server.safetensors"),
    )
    assert all(torch.equal(got[k], want[k]) for k in want)
    resumed, whole = (rounds_without_cpu(run / "rounds.jsonl") for run in (tmp_path / "resumed", straight))
    assert resumed == whole


def test_a_resume_on_other_data_is_refused(tmp_path):
    """A checkpoint records a digest of the clients' training examples: a resume after a task
    file changed is refused with one clear error (not a run whose rounds trained on two datasets);
    a checkpoint from before the digest was kept resumes as it did."""
    tasks = write_tasks(tmp_path / "tasks")
    cfg = run_config(tmp_path / "run", tasks, "fedit")

    def crash(rnd, client, _):
        if (rnd, client) == (2, 0):
            raise Crash

    with pytest.raises(Crash):
        fed.run(cfg, log=lambda _: None, on_client=crash)
    original = Path(tasks[1]).read_text()
    Path(tasks[1]).write_text(original.replace('"answer": 0', '"answer": 1', 1))
    with pytest.raises(InputError, match="round 1\\) was written while training on other data"):
        fed.run(cfg, resume=True, log=lambda _: None)
    Path(tasks[1]).write_text(original)
    state_file = tmp_path / "run" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert len(state["record"].pop("data")) == 16
    state_file.write_text(json.dumps(state))
    assert fed.run(cfg, resume=True, log=lambda _: None)["rounds"] == 2


CPU_KEYS = ("cpu_seconds", "eval_cpu_seconds")


def rounds_without_cpu(path: Path) -> list[dict]:
    """A run's round records with the CPU time each round took (which no two runs share) left out."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["cpu_seconds"] > 0 for r in records)
    return [{k: v for k, v in r.items() if k not in CPU_KEYS} for r in records]


def test_a_run_counts_its_cpu_time_per_round_and_across_a_resume(task_files, tmp_path):
    """Each round records the CPU seconds its training (and its evaluation) took; results.json
    sums them. A round written before rounds counted CPU time leaves the sum uncounted (None),
    said so in results.md, not silently short."""
    cfg = run_config(tmp_path / "run", task_files, "fedit")
    results = fed.run(cfg, log=lambda _: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert results["cpu_seconds"]["rounds"] == pytest.approx(sum(r["cpu_seconds"] for r in records))
    evaluated = [r for r in records if "scores" in r]
    assert results["cpu_seconds"]["evaluation"] == pytest.approx(
        sum(r["eval_cpu_seconds"] for r in evaluated)
    )
    assert all(r["cpu_seconds"] > 0 for r in records) and results["cpu_seconds"]["evaluation"] > 0
    assert "CPU time: rounds " in (tmp_path / "run" / "results.md").read_text()

    def crash(rnd, client, _):
        if (rnd, client) == (2, 0):
            raise Crash

    old = run_config(tmp_path / "old", task_files, "fedit")
    with pytest.raises(Crash):
        fed.run(old, log=lambda _: None, on_client=crash)
    state_file = tmp_path / "old" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    (counted,) = state["record"]["rounds"]
    state["record"]["rounds"] = [
        {k: v for k, v in counted.items() if k != "cpu_seconds"}
    ]  # training uncounted
    state_file.write_text(json.dumps(state))
    resumed = fed.run(old, resume=True, log=lambda _: None)
    assert resumed["cpu_seconds"]["rounds"] is None and resumed["cpu_seconds"]["evaluation"] > 0
    assert "CPU time: rounds not counted, evaluation " in (tmp_path / "old" / "results.md").read_text()


def test_combined_alora_reproduces_every_client(fedalora_run):
    alora = load_adapter(load_model("tiny-llama")[0], fedalora_run / "alora")
    assert alora.adapter_config.router == "task" and alora.adapter_config.num_experts == 3
    for i, client in enumerate(["task0", "task1", "task2"]):
        own = load_adapter(load_model("tiny-llama")[0], fedalora_run / "adapters" / client)
        assert (logits(alora, task_ids=i) - logits(own)).abs().max() <= 1e-6


def client_model(run: Path, client: str):
    """A client's final model from the run folder: base (+ FLoRA's merged update) + adapter."""
    base = load_model("tiny-llama")[0]
    if fed.load_config(run / "config.yaml").federation.method == "flora":
        with torch.no_grad():
            for key, delta in read_tensors(run / "server.safetensors").items():
                base.get_submodule(key.rsplit(".", 1)[0]).weight.add_(delta)
    return load_adapter(base, run / "adapters" / client)


@pytest.mark.parametrize("run", ["fedalora_run", "het_run", "flora_run"])
def test_export_client_loads_in_peft(run, request, tmp_path):
    folder = request.getfixturevalue(run)
    fed.export_client(folder, 1, tmp_path / "peft")
    own = client_model(folder, "task1")
    peft_model = PeftModel.from_pretrained(load_model("tiny-llama")[0], tmp_path / "peft")
    assert (logits(peft_model) - logits(own)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no client"):
        fed.export_client(folder, "nobody", tmp_path / "x")


def test_heterogeneous_run_records_each_clients_rank_and_bytes(het_run):
    clients = json.loads((het_run / "clients.json").read_text())
    assert [c["rank"] for c in clients] == HET_RANKS
    ups = [c["bytes_up_per_round"] for c in clients]
    assert ups[0] > ups[1] == ups[2], "upload grows with the client's rank"
    assert len({c["bytes_down_per_round"] for c in clients}) == 1, "everyone downloads B_base"


# --- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"adapter": {"ranks": [4, 2]}}, "adapter.ranks has 2 entries but there are 3 clients"),
        ({"adapter": {"ranks": [4, 2, 2]}}, "adapter.ranks=.*fedalora"),
        (
            {"federation": {"rounds": 2, "method": "fedit", "reset_a_each_round": True}},
            "federation.reset_a_each_round",
        ),
        ({"train": {"stpes": 2}}, "train.stpes"),
        ({"train": {"batch_size": 8, "grad_accum": 3}}, "train.grad_accum=3 must divide train.batch_size=8"),
        ({"clients": {"partition": "dirichlet"}}, "clients.num_clients"),
    ],
)
def test_config_errors_name_the_key(change, message, task_files, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_config(tmp_path, task_files, **change)


# --- Dirichlet partition ------------------------------------------------------------------------
def test_dirichlet_split_is_seeded_disjoint_and_skewed_by_alpha():
    labels = [t for t in range(4) for _ in range(50)]
    split = dirichlet_split(labels, 5, alpha=0.1, seed=0)
    assert split == dirichlet_split(labels, 5, alpha=0.1, seed=0)
    assert sorted(i for part_ in split for i in part_) == list(range(200))
    assert min(len(p) for p in split) >= 1

    def mean_top_share(alpha: float) -> float:
        parts = dirichlet_split(labels, 5, alpha=alpha, seed=1)
        return sum(max(sum(labels[i] == t for i in p) for t in range(4)) / len(p) for p in parts) / 5

    assert mean_top_share(0.05) > mean_top_share(100.0)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_split([0, 1], 3, alpha=1.0, seed=0)


def test_dirichlet_clients_hold_every_training_example_once(task_files):
    clients = build_clients(
        ClientsConfig(tasks=task_files, partition="dirichlet", num_clients=4, dirichlet_alpha=0.5)
    )
    assert len(clients) == 4
    assert sum(len(e) for c in clients for e in c.examples) == 24
    for c in clients:
        assert abs(sum(c.shares) - 1) < 1e-9
        assert all(ex.task_id == k for k, e in enumerate(c.examples) for ex in e)


def test_participants_are_a_seeded_fraction_per_round():
    picks = [participants(10, 0.3, seed=1, rnd=r) for r in range(1, 6)]
    assert all(len(p) == 3 and p == sorted(set(p)) for p in picks)
    assert picks == [participants(10, 0.3, seed=1, rnd=r) for r in range(1, 6)]
    assert len({tuple(p) for p in picks}) > 1, "the draw changes from round to round"
    assert participants(10, 1.0, seed=1, rnd=1) == list(range(10))
    assert participants(10, 0.01, seed=1, rnd=1) != [], "at least one client per round"


def test_partial_train_section_keeps_the_federated_training_defaults(task_files, tmp_path):
    cfg = fed.load_config(
        base={"output_dir": str(tmp_path), "clients": {"tasks": task_files}},
        overrides=["train.steps=3"],
    )
    assert (cfg.train.steps, cfg.train.lr, cfg.train.schedule) == (3, 5e-4, "constant")


@pytest.mark.parametrize(("schedule", "factors"), [("constant", [1, 1, 1, 1]), ("linear", [1, 0.75, 0.5, 0.25]),
                                                   ("cosine", [1, 0.853553, 0.5, 0.146447])])  # fmt: skip
def test_round_schedule_gives_each_round_its_lr(schedule, factors, task_files, tmp_path):
    """Round t of R trains at train.lr x schedule((t - 1) / R): what the simulator's clients
    really step with, read from their training history."""
    cfg = run_config(tmp_path, task_files, federation={"rounds": 4, "round_schedule": schedule},
                     train={"steps": 1, "batch_size": 2, "lr": 1e-2})  # fmt: skip
    got = [cfg.federation.train_for_round(cfg.train, t).lr / 1e-2 for t in (1, 2, 3, 4)]
    assert got == pytest.approx(factors, abs=1e-6)
    base, tokenizer = load_model("tiny-llama")
    sim = fed.make_simulator(cfg, build_clients(cfg.clients), base, tokenizer)
    seen: dict[int, set] = {}

    def lr_of(rnd: int, _i: int, history: list) -> None:
        seen.setdefault(rnd, set()).update(round(h["lr"] / 1e-2, 6) for h in history)

    for _ in range(2):
        sim.run_round(on_client=lr_of)
    assert seen == {1: {round(got[0], 6)}, 2: {round(got[1], 6)}}
