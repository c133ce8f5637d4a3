"""Peak memory of the in-process federated simulator: one base model plus N adapter states.

Each measurement runs in a fresh process (peak RSS is per process): load the model, build the
simulator for N clients (q_proj, v_proj adapted, rank r), run one round in which every client
trains ``--steps`` local steps on a few short examples, and report the peak resident set size
against the RSS right after loading the model, with the size of the clients' adapter states.

    python benchmarks/federated_memory.py [--model smollm2-135m] [--clients 8,64]
        [--methods fedalora,flora] [--rank 8] [--steps 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MB = 2**20


def rss_mb() -> float:
    """The current resident set size (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MB


def measure(model_name: str, method: str, num_clients: int, rank: int, steps: int) -> dict:
    """One measurement, in this process."""
    import torch

    from asymlora.adapters import AdapterConfig
    from asymlora.engines import Client, LocalSimulator
    from asymlora.federated import get_method
    from asymlora.models import load_model
    from asymlora.train import Example, TrainConfig, encode_tasks, pad_id_of

    torch.set_num_threads(1)
    base, tokenizer = load_model(model_name)
    after_load = rss_mb()
    examples = [[Example(f"Question {j}: what is {j} plus {j}?", f" {2 * j}", 0) for j in range(4)]]
    encoded = encode_tasks(tokenizer, examples, 64)
    clients = [Client(f"c{i}", encoded, rank, 2.0 * rank) for i in range(num_clients)]
    t0 = time.perf_counter()
    sim = LocalSimulator(
        base,
        get_method(method),
        clients,
        AdapterConfig(method="lora", target_modules=["q_proj", "v_proj"], dropout=0.0),
        TrainConfig(steps=steps, batch_size=1, lr=1e-4),
        pad_id=pad_id_of(tokenizer),
    )
    log = sim.run_round()
    seconds = time.perf_counter() - t0
    state_bytes = sum(t.numel() * t.element_size() for s in sim.states for t in s.values())
    init_bytes = sum(t.numel() * t.element_size() for s in sim.inits for t in s.values())
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    return {
        "model": model_name,
        "method": method,
        "clients": num_clients,
        "rank": rank,
        "base_model_mb": base_bytes / MB,
        "rss_after_load_mb": after_load,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "client_states_mb": state_bytes / MB,
        "client_inits_mb": init_bytes / MB,
        "bytes_up_per_client": log.comm[0]["bytes_up"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", default="8,64")
    parser.add_argument("--methods", default="fedalora,flora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.methods, int(args.clients), args.rank, args.steps)))
        return
    rows = []
    for method in args.methods.split(","):
        for n in args.clients.split(","):
            cmd = [sys.executable, __file__, "--one", "--model", args.model, "--methods", method]
            cmd += ["--clients", n, "--rank", str(args.rank), "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{method:>12} N={r['clients']:>3}: peak RSS {r['peak_rss_mb']:.0f} MiB "
                f"(after loading the model {r['rss_after_load_mb']:.0f}; base weights {r['base_model_mb']:.0f}; "
                f"client states {r['client_states_mb']:.1f} + inits {r['client_inits_mb']:.1f}) "
                f"in {r['seconds']:.0f} s",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
