"""The Flower engine against the in-process simulator, over a real SuperLink and 4 SuperNodes on
127.0.0.1 (scripts/flower_local.sh), 2 rounds on tiny-llama with tiny task files.

One federation serves three runs at once (fedalora, fedalora-het, flora). In each, clients 0-2
are honest and client 3 is a bad node (the ``test-poison`` hook): its upload is NaN, has an
extra tensor, a wrong shape, a huge norm or a wrong dtype, or its ClientApp raises. The server
must leave it out of every round and aggregate exactly what the simulator aggregates for the 3
honest clients: the same server tensors (max abs diff <= 1e-6; FLoRA, whose merged base differs
by float rounding between the engines, <= 1e-5), the same participants, the same bytes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from flower_poison import app_folder, poison_plan  # noqa: E402
from flower_processes import ROOT, as_flag, flower_env, start, stop
from tiny_models import write_choice_tasks

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytest.importorskip("flwr")

from flwr.common.config import flatten_dict  # noqa: E402

from asymlora.adapters import read_tensors  # noqa: E402
from asymlora.data.clients import build_clients  # noqa: E402
from asymlora.engines.flower import ROUNDS_FILE, SERVER_FILE, federated_config  # noqa: E402
from asymlora.models import load_model  # noqa: E402
from asymlora.recipes import federated as fed  # noqa: E402

SCRIPT = ROOT / "scripts" / "flower_local.sh"
ROUNDS, NODES, HONEST = 2, 4, 3
LIMIT_S = 900  # the whole federation; on a loaded 2-core machine it has taken 7 minutes
BAD = f"task{HONEST}"  # the name of client 3

# method -> (ranks of the 4 clients, what client 3 does in rounds 1 and 2, extra overrides,
#            what the server must say about it in each round)
RUNS = {
    "fedalora": (  # with an lr falling over the rounds: both engines must train round 2 at lr / 2
        "",
        "nan,raise",
        {"federation.round_schedule": "linear"},
        [("rejected", "NaN"), ("dropped", "raises in round 2")],
    ),
    "fedalora-het": (
        "4,2,2,2",
        "extra-name,shape",
        {},
        [("rejected", "unexpected tensor"), ("rejected", "shape")],
    ),
    "flora": (
        "4,2,2,2",
        "huge,dtype",
        {"federation.max_upload_norm": 1000.0},
        [("rejected", "exceeds max_upload_norm"), ("rejected", "dtype torch.float64")],
    ),
}
# Flower's strategy wrappers around asymlora's strategy, with no noise and a bound no update
# reaches (so the wrapped run must equal the simulator; tests/test_flower_central_dp.py checks
# the clipping and the noise): central DP clipped on the server, and central DP clipped on the
# nodes around a robust (median) aggregate. The bad client is screened out before any wrapper
# sees its reply (a wrapper alone would skip the round of an error reply).
NO_NOISE = {"federation.dp_noise_multiplier": 0.0, "federation.dp_clipping_norm": 1e6}
RUNS |= {
    "fedit": (
        "",
        "nan,raise",
        {"federation.central_dp": "server"} | NO_NOISE,
        [("rejected", "NaN"), ("dropped", "raises in round 2")],
    ),
    "fedsa": (
        "",
        "shape,huge",
        {"federation.central_dp": "client", "federation.aggregation": "median"}
        | NO_NOISE
        | {"federation.max_upload_norm": 1000.0},
        [("rejected", "shape"), ("rejected", "exceeds max_upload_norm")],
    ),
}
TOLERANCE = {"fedalora": 1e-6, "fedalora-het": 1e-6, "flora": 1e-5, "fedit": 1e-6, "fedsa": 1e-6}


def run_config(method: str, tasks: list[str], out: Path, ranks: str = "") -> dict[str, object]:
    return {
        "federation.method": method,
        "federation.rounds": ROUNDS,
        "model": "tiny-llama",
        "seed": 3,
        "clients.tasks": ",".join(tasks),
        "adapter.ranks": ranks,
        "output_dir": str(out),
        "adapter.r": 4,
        "adapter.d_m": 4,
        "adapter.dropout": 0.1,
        "train.steps": 2,
        "train.batch_size": 2,
        "train.lr": 1e-2,
        "num-threads": 1,
        "timeout-s": 300,
        "save-adapters": False,
    }


def start_flower(configs: list[dict[str, object]], logs: Path) -> subprocess.Popen:
    """The script, in its own process group, running every config at once on NODES nodes."""
    logs.mkdir(parents=True)
    env = flower_env(FLOWER_LOGS=str(logs), PYTHON=sys.executable, FLOWER_PRELOAD="tiny-llama")
    env["FLOWER_APP"] = str(app_folder(logs.parent / "app", ROOT / "pyproject.toml"))  # bad clients
    args: list[str] = [str(SCRIPT), str(NODES)]
    for k, config in enumerate(configs):
        args += ([":::"] if k else []) + ["--run-config", as_flag(config)]
    return start(args, logs / "flower.out", env)


def simulate(config: dict[str, object]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    cfg = federated_config(config)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, tokenizer = load_model(cfg.model)
        clients = build_clients(cfg.clients)
        sim = fed.make_simulator(cfg, clients, base, tokenizer)
        records: list[dict] = []
        for _ in range(ROUNDS):
            records.append(sim.aggregator.record(sim.run_round(), records))
    finally:
        torch.set_num_threads(before)
    return sim.server, records


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every run of RUNS over one real federation; meanwhile, in this process, the simulator on
    the honest clients of each."""
    root = tmp_path_factory.mktemp("flower")
    tasks = write_choice_tasks(root / "tasks", NODES)
    runs: dict[str, dict] = {}
    for method, (ranks, poison, extra, _) in RUNS.items():
        config = run_config(method, tasks, root / method, ranks) | extra
        honest = run_config(method, tasks[:HONEST], root / "sim", ",".join(ranks.split(",")[:HONEST])) | extra
        runs[method] = {"flower": config | {"test-poison": f"{HONEST}:{poison}"}, "honest": honest}
    started = time.monotonic()
    proc = start_flower([r["flower"] for r in runs.values()], root / "logs")
    try:
        for run in runs.values():
            run["expected"], run["records"] = simulate(run["honest"])
        rc = proc.wait(max(1.0, LIMIT_S - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        stop(proc)
    wall = time.monotonic() - started
    print(f"\nFlower: {len(runs)} runs of {ROUNDS} rounds on {NODES} SuperNodes in {wall:.0f} s")
    output = (root / "logs" / "flower.out").read_text()
    assert rc == 0, f"flower_local.sh: {rc} after {wall:.0f} s\n{output[-4000:]}"
    for run in runs.values():
        run["output"] = output
    return runs


def test_run_config_maps_to_the_recipe_config(tmp_path: Path) -> None:
    """The app's declared defaults parse, and the run-config keys land in the recipe's fields."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert declared["components"]["clientapp"] == "asymlora.engines.flower:client_app"
    flat = flatten_dict(declared["config"])
    assert flat["output_dir"] == "runs/flower" and federated_config(flat).output_dir == "runs/flower"
    assert "test-poison" not in flat  # a key of the tests' own app only
    assert poison_plan({"test-poison": "3:nan,-;1:raise"}) == {3: ["nan", "-"], 1: ["raise"]}
    cfg = federated_config(run_config("fedalora-het", ["a.jsonl", "b.jsonl"], tmp_path, "4,2"))
    assert (cfg.federation.method, cfg.federation.rounds, cfg.model, cfg.seed) == (
        "fedalora-het",
        2,
        "tiny-llama",
        3,
    )
    assert (cfg.clients.tasks, cfg.adapter.ranks, cfg.output_dir) == (
        ["a.jsonl", "b.jsonl"],
        [4, 2],
        str(tmp_path),
    )
    assert (cfg.adapter.d_m, cfg.train.steps, cfg.train.lr) == (4, 2, 1e-2)


def test_the_app_declares_every_config_field(tmp_path: Path) -> None:
    """Flower accepts only declared run-config keys: every field of asymlora federate's config
    is declared (as "" = unset), and each becomes a typed override of that field."""
    declared = flatten_dict(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    )
    fields = {k for k in declared if "-" not in k and k != "config"}
    assert fields == set(leaf_paths(fed.FederatedConfig))
    cfg = federated_config(declared | {"adapter.target_modules": "q_proj,k_proj", "federation.trim": 0.2})
    assert cfg.adapter.target_modules == ["q_proj", "k_proj"] and cfg.federation.trim == 0.2
    with pytest.raises(fed.ConfigError, match="unknown key federation.methd"):
        federated_config({"federation.methd": "flora"})


def leaf_paths(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


@pytest.mark.parametrize("method", list(RUNS))
def test_flower_matches_simulator_on_the_honest_clients(federation: dict, method: str) -> None:
    run = federation[method]
    out = Path(str(run["flower"]["output_dir"]))
    expected = run["expected"]
    got = read_tensors(out / SERVER_FILE)
    assert sorted(got) == sorted(expected)
    diff = max((got[k] - expected[k].cpu()).abs().max().item() for k in expected)
    print(f"\n{method}: Flower against the simulator, max abs diff {diff:.1e}")
    assert diff <= TOLERANCE[method], diff
    lines = [json.loads(line) for line in (out / ROUNDS_FILE).read_text().splitlines()]
    assert len(lines) == ROUNDS
    for line, record in zip(lines, run["records"], strict=True):
        assert line["participants"] == record["participants"] == [f"task{i}" for i in range(HONEST)]
        # one record, written by engines.round for both engines; under central DP with the
        # run's (ε, δ) (z = 0 here: no finite ε, written as null)
        dp = {"epsilon", "delta"} if "federation.central_dp" in RUNS[method][2] else set()
        assert line.keys() - dp == record.keys() and dp <= line.keys()
        assert not dp or (line["epsilon"] is None and line["delta"] == 1e-5)
        for key in ("comm", "bytes_up", "bytes_down", "cumulative_bytes"):
            assert line[key] == record[key], key


@pytest.mark.parametrize("method", list(RUNS))
def test_flower_leaves_the_bad_client_out_with_its_reason(federation: dict, method: str) -> None:
    out = Path(str(federation[method]["flower"]["output_dir"]))
    lines = [json.loads(line) for line in (out / ROUNDS_FILE).read_text().splitlines()]
    for line, (kind, reason) in zip(lines, RUNS[method][3], strict=True):
        other = "dropped" if kind == "rejected" else "rejected"
        assert list(line[kind]) == [BAD] and not line[other], line
        assert reason in line[kind][BAD], line[kind]
        said = f"round {line['round']}: {'dropped' if kind == 'dropped' else 'rejected the upload of'} client {BAD} (node "
        assert said in federation[method]["output"]
