"""Two measurements of one federated round of the simulator on SmolLM2-135M (docs/performance.md).

1. The wire dtype: the same round's float32 uploads aggregated after travelling as bfloat16 or
   float16 (and the download cast back to the wire dtype), against the float32 aggregate. Error
   is relative (Frobenius norm of the difference over the float32 aggregate's norm, all tensors
   together) and the largest absolute difference.
2. The round's overhead: the time of a round outside the clients' local training (selection,
   loading a client's state into the shared model, upload, validation, aggregation, applying the
   downloads, the record, and the recipe's checkpoint) against the local training itself.

    python benchmarks/federated_round.py --config configs/fed-nlp-smollm2.yaml [--rounds 2]
        [--steps 1] [--methods fedalora,fedit,flexlora] [--json docs/bench/federated_round.json]
        [--small-tasks]

``--small-tasks`` replaces the suite's tasks by 8 short yes/no task files written to a temporary
folder (one per client, 16 training examples each), so that a round costs seconds of CPU rather
than the suite's loading; the model, adapters and local training are the config's.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLOCK = {"now": time.perf_counter}  # --cpu-time: time.process_time (this process's CPU seconds)


def now() -> float:
    """The benchmark's clock: wall seconds, or with --cpu-time the process's CPU seconds (with
    one torch thread, robust to other jobs on a shared machine)."""
    return CLOCK["now"]()


def relative_error(got: dict, want: dict) -> tuple[float, float]:
    """(||got - want|| / ||want||, max |got - want|) over all tensors together."""
    diff = sum(float((got[k].double() - want[k].double()).pow(2).sum()) for k in want)
    norm = sum(float(want[k].double().pow(2).sum()) for k in want)
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
    return math.sqrt(diff / norm) if norm else 0.0, worst


def simulator(cfg, method: str):
    from dataclasses import replace

    from asymlora.data.clients import build_clients
    from asymlora.models import load_model
    from asymlora.recipes import federated as fed

    cfg = replace(cfg, federation=replace(cfg.federation, method=method))
    clients = build_clients(cfg.clients)
    base, tokenizer = load_model(cfg.model)
    return fed.make_simulator(cfg, clients, base, tokenizer)


def wire_errors(cfg, method: str) -> dict:
    """One round; its float32 uploads aggregated after each wire dtype, against float32."""
    import torch

    from asymlora.federated.comm import WIRE_DTYPES, from_wire, to_wire

    sim = simulator(cfg, method)
    server0 = dict(sim.server)
    log = sim.run_round()
    uploads = sim.last_uploads  # float32, as the clients sent them (see record_uploads)
    weights = [sim.clients[i].n_examples for i in log.participants]
    scales = [sim.clients[i].scale for i in log.participants]
    exact, downs = sim.method.aggregate(uploads, weights, server0, scales)
    out = {}
    for name, dtype in WIRE_DTYPES.items():
        if dtype == torch.float32:
            continue
        received = [from_wire(to_wire(u, dtype)) for u in uploads]
        state, downloads = sim.method.aggregate(received, weights, server0, scales)
        rel, worst = relative_error(state, exact)
        rel_down, worst_down = relative_error(from_wire(to_wire(downloads[0], dtype)), downs[0])
        out[name] = {
            "aggregate_rel_error": rel,
            "aggregate_max_abs_error": worst,
            "download_rel_error": rel_down,
            "download_max_abs_error": worst_down,
        }
    return out


@contextmanager
def timed(module, name: str) -> Iterator[dict[str, float]]:
    """Inside, ``module.name`` (a module's function or a class's method) is a wrapper adding its
    wall time to the yielded ``{"s": ...}``."""
    saved, original, total = vars(module)[name], getattr(module, name), {"s": 0.0}

    def wrapper(*args, **kwargs):
        start = now()
        try:
            return original(*args, **kwargs)
        finally:
            total["s"] += now() - start

    setattr(module, name, wrapper)
    try:
        yield total
    finally:
        setattr(module, name, saved)


def overhead(cfg, method: str, rounds: int, out: Path) -> dict:
    """Per round: the local training time, and the rest of the round and of the checkpoint."""
    import asymlora.engines.local as local

    sim = simulator(cfg, method)
    rows = []
    records: list[dict] = []
    with timed(local, "train_locally") as trained:
        for _ in range(rounds):
            trained["s"] = 0.0
            start = now()
            records.append(sim.aggregator.record(sim.run_round(), records))
            round_s = now() - start
            start = now()
            sim.save(out / "checkpoint", {"rounds": records})
            checkpoint_s = now() - start
            rows.append(
                {
                    "training_s": trained["s"],
                    "round_s": round_s,
                    "outside_training_s": round_s - trained["s"],
                    "checkpoint_s": checkpoint_s,
                }
            )
    return {"rounds": rows, "clients": len(sim.clients)}


def record_uploads(cls):
    """The simulator class with each round's uploads kept (in participant order, float32)."""

    class Recording(cls):
        def client_upload(self, rnd, i):
            upload = super().client_upload(rnd, i)
            self.sent[i] = upload
            return upload

        def run_round(self, on_client=None):
            self.sent = {}
            log = super().run_round(on_client)
            self.last_uploads = [self.sent[i] for i in log.participants]
            return log

    return Recording


def small_tasks(folder: Path, n: int = 8, size: int = 20) -> list[str]:
    """``n`` short yes/no multiple-choice JSONL task files, one per client."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        rows = [
            {"prompt": f"Task {k}, item {j}: is {j} even?", "choices": ["yes", "no"], "answer": j % 2}
            for j in range(size)
        ]
        path = folder / f"task{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths


def round_arguments(doc: str, methods: str, rounds: int) -> argparse.ArgumentParser:
    """The flags both round benchmarks take."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", default="configs/fed-nlp-smollm2.yaml")
    parser.add_argument("--methods", default=methods)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=1, help="local steps per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-time", action="store_true", help="time in process CPU seconds, not wall")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--small-tasks", action="store_true", help="8 short local tasks instead of the suite")
    return parser


def setup(args: argparse.Namespace) -> None:
    """Torch's threads and the clock as the flags say."""
    import torch

    torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK["now"] = time.process_time


def main() -> None:
    args = round_arguments(__doc__, "fedalora,fedit,flexlora", 2).parse_args()
    setup(args)
    import asymlora.recipes.federated as fed

    fed.LocalSimulator = record_uploads(fed.LocalSimulator)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [(("train", "steps"), args.steps)]
        if args.small_tasks:
            overrides.append((("clients", "tasks"), small_tasks(Path(tmp) / "tasks")))
        cfg = fed.load_config(args.config, overrides)
        result = {
            "model": cfg.model,
            "steps": args.steps,
            "threads": args.threads,
            "clock": "process CPU time" if args.cpu_time else "wall",
            "tasks": "8 small local tasks" if args.small_tasks else cfg.clients.suite,
        }
        result |= {"batch_size": cfg.train.batch_size, "methods": {}}
        for method in args.methods.split(","):
            entry = {"wire": wire_errors(cfg, method)}
            entry["overhead"] = overhead(cfg, method, args.rounds, Path(tmp) / method)
            result["methods"][method] = entry
            print(method, json.dumps(entry, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
