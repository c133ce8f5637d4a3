"""The Flower engine against the in-process simulator: a real SuperLink and 3 SuperNodes on
127.0.0.1 (scripts/flower_local.sh), 2 rounds on tiny-llama with tiny task files; the server's
aggregated tensors and the bytes per round must equal the simulator's for the same config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_models import write_choice_tasks

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytest.importorskip("flwr")

from asymlora.adapters import read_tensors  # noqa: E402
from asymlora.engines.flower import ROUNDS_FILE, SERVER_FILE, federated_config  # noqa: E402
from asymlora.models import load_model  # noqa: E402
from asymlora.recipes import federated as fed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "flower_local.sh"
ROUNDS = 2
LIMIT_S = 600


def write_tasks(folder: Path, n: int = 3, size: int = 10) -> list[str]:
    return write_choice_tasks(folder, n, size)


def run_config(method: str, tasks: list[str], out: Path, ranks: str = "") -> dict[str, object]:
    overrides = "adapter.r=4;adapter.d_m=4;adapter.dropout=0.1;train.steps=2;train.batch_size=2;train.lr=1e-2"
    return {
        "method": method,
        "rounds": ROUNDS,
        "model": "tiny-llama",
        "seed": 3,
        "tasks": ",".join(tasks),
        "ranks": ranks,
        "output-dir": str(out),
        "overrides": overrides,
        "num-threads": 1,
        "timeout-s": 300,
        "save-adapters": False,
    }


def as_flag(config: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v) if isinstance(v, int) else json.dumps(str(v))

    return " ".join(f"{k}={value(v)}" for k, v in config.items())


def rounds_done(out: Path) -> int:
    path = out / ROUNDS_FILE
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_flower(config: dict[str, object], out: Path, logs: Path) -> None:
    """The script in its own process group, until the server has written every round; the whole
    group is killed afterwards, whatever happened."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env |= {"FLOWER_LOGS": str(logs), "PYTHON": sys.executable}
    with (logs.parent / "flower.out").open("w") as sink:
        proc = subprocess.Popen(
            [str(SCRIPT), "3", "--run-config", as_flag(config)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + LIMIT_S
            while rounds_done(out) < ROUNDS and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    assert rounds_done(out) == ROUNDS, (logs.parent / "flower.out").read_text()[-3000:]


def simulate(config: dict[str, object]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    cfg = federated_config(config)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, tokenizer = load_model(cfg.model)
        clients = fed.build_clients(cfg.clients)
        sim = fed.make_simulator(cfg, clients, base, tokenizer)
        records: list[dict] = []
        for _ in range(ROUNDS):
            records.append(fed.round_record(sim.run_round(), clients, records))
    finally:
        torch.set_num_threads(before)
    return sim.server, records


# Each Flower message is served by a fresh ClientApp process that imports torch and transformers;
# on this 2-core shared machine a round trip takes about a minute, so a 2-round run takes about
# 4 minutes (over the 3 the issue asks for). It is opt-in until that is brought down.
needs_flower_run = pytest.mark.skipif(
    os.environ.get("ASYMLORA_FLOWER_TEST") != "1",
    reason="starts a real SuperLink + 3 SuperNodes and takes ~4 min on 2 shared cores; "
    "set ASYMLORA_FLOWER_TEST=1 to run it",
)


def test_run_config_maps_to_the_recipe_config(tmp_path: Path) -> None:
    """The app's declared defaults parse, and the run-config keys land in the recipe's fields."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert declared["components"]["clientapp"] == "asymlora.engines.flower:client_app"
    assert federated_config(declared["config"]).federation.method == declared["config"]["method"]
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


@needs_flower_run
@pytest.mark.parametrize(("method", "ranks"), [("fedalora", ""), ("fedalora-het", "4,2,2")])
def test_flower_matches_simulator(tmp_path: Path, method: str, ranks: str) -> None:
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    config = run_config(method, tasks, out, ranks)
    run_flower(config, out, tmp_path / "logs")

    expected, records = simulate(config)
    got = read_tensors(out / SERVER_FILE)
    assert sorted(got) == sorted(expected)
    diff = max((got[k] - expected[k].cpu()).abs().max().item() for k in expected)
    assert diff <= 1e-6, diff
    lines = [json.loads(line) for line in (out / ROUNDS_FILE).read_text().splitlines()]
    for line, record in zip(lines, records, strict=True):
        assert line["participants"] == record["participants"]
        assert line["comm"] == record["comm"]
