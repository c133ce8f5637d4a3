"""What a client keeps of a federated round: how much of the change a download makes to a
client's adapter is made of what the clients themselves learned that round (issue 17's question
of Fed-ALoRA's initial A).

In round t, client j starts from the delta W_j = s B_j A_j (summed over the adapted modules),
trains to W'_j, and after the download holds W''_j. Its learned change is L_j = W'_j - W_j; the
change the round makes to client i is C_i = W''_i - W_i. Two numbers per client, averaged over
clients, per round:

- explained: the share of ||C_i||^2 that lies in the span of every client's learned change
  L_1..L_N (1 when the download is a combination of what the clients learned, as FedIT's
  average of A and B products is not exactly but nearly; low when the download reads a B learned
  for another client's A through this client's A, a product no client learned);
- own: <C_i, L_i> / ||L_i||^2, how much of its own learned change the client keeps (about p_i,
  its weight, under an average of unrelated updates; 1 when nothing is averaged).

The d_out x d_in products are kept in float32 (two per client); inner products are summed module
by module in float64.

    python benchmarks/update_alignment.py --config configs/fed-nlp-smollm2.yaml --rounds 2 \\
        --variants fedit,fedalora,fedalora:common --json docs/bench/update_alignment.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch


def products(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """module -> s B A (float32) of a LoRA-shaped state."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            out[module] = scale * (state[f"{module}.lora_B"].float() @ a.float())
    return out


def inner(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    return sum(float(torch.dot(x[m].flatten().double(), y[m].flatten().double())) for m in x)


def minus(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: x[m] - y[m] for m in x}


def round_alignment(start, learned, after) -> dict[str, float]:
    """``start``, ``learned``, ``after``: per client, module -> delta W at the round's start, the
    change local training made to it, and delta W after the download."""
    gram = np.array([[inner(a, b) for b in learned] for a in learned])
    pinv = np.linalg.pinv(gram)
    explained, own = [], []
    for i, (s, a) in enumerate(zip(start, after, strict=True)):
        change = minus(a, s)
        norm = inner(change, change)
        b = np.array([inner(change, lj) for lj in learned])
        explained.append(float(b @ pinv @ b) / norm if norm else float("nan"))
        own.append(b[i] / gram[i, i] if gram[i, i] else float("nan"))
    return {"explained": float(np.mean(explained)), "own": float(np.mean(own)), "clients": len(start)}


def run_variant(
    cfg, clients, base, tokenizer, spec: str, rounds: int, log=lambda line: print(line, flush=True)
) -> list[dict]:
    from asymlora.recipes import federated as fed

    method, _, a_init = spec.partition(":")
    federation = replace(cfg.federation, method=method, **({"client_a_init": a_init} if a_init else {}))
    sim = fed.make_simulator(replace(cfg, federation=federation), clients, base, tokenizer)
    scales = [sim.client_config(i).scale for i in range(len(clients))]
    rows = []
    for rnd in range(1, rounds + 1):
        start = [products(s, k) for s, k in zip(sim.states, scales, strict=True)]
        trained: dict[int, dict] = {}

        def keep(_rnd: int, i: int, _history: list, trained=trained, start=start) -> None:
            trained[i] = minus(products(sim.states[i], scales[i]), start[i])

        t0 = time.process_time()
        sim.run_round(on_client=keep)
        after = (products(s, k) for s, k in zip(sim.states, scales, strict=True))
        row = {"round": rnd, **round_alignment(start, [trained[i] for i in range(len(clients))], after)}
        row["cpu_s"] = time.process_time() - t0
        log(
            f"{spec} round {rnd}: explained {row['explained']:.3f}, own {row['own']:.3f} ({row['cpu_s']:.0f} CPU s)"
        )
        rows.append(row)
    if sim.model is not None:
        sim.model.unload()  # the base model back as it was, for the next variant
    return rows


def main(argv: list[str] | None = None) -> int:
    from asymlora.data.clients import build_clients
    from asymlora.fedconfig import load_config
    from asymlora.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="fedit,fedalora,fedalora:common",
                    help="method[:client_a_init], comma-separated")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    clients = build_clients(cfg.clients)
    base, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "rounds": args.rounds,
        "variants": {
            v: run_variant(cfg, clients, base, tokenizer, v, args.rounds) for v in args.variants.split(",")
        },
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
