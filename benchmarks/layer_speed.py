"""Forward+backward time of one adapted linear layer: our shapes against PEFT's LoRA and against
the reference's per-expert loop. Prints ratios measured in one run (the machine is shared and
noisy: the variants are interleaved round by round and each reports its median).

    python benchmarks/layer_speed.py [--dims 576,2048,4096] [--tokens 1024] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils.benchmark import Timer

from asymlora.adapters import AdapterConfig, MultiLoraLinear
from asymlora.adapters.layer import RoutingState

R, K, ALPHA = 8, 3, 16


class PerExpertALoRA(nn.Module):
    """The reference formulation: every expert applies its own A and then the shared B,
    so B runs K times: y = W0 x + s sum_i g_i B (A_i dropout(x)). Float32 adapters on the base's
    device, computing in float32 over a lower-precision base (as PEFT's LoRA does by default)."""

    def __init__(self, base: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        d_in, d_out = base.in_features, base.out_features
        self.A = nn.ModuleList(nn.Linear(d_in, R, bias=False) for _ in range(K))
        self.B = nn.Linear(R, d_out, bias=False)
        nn.init.normal_(self.B.weight, std=0.01)
        self.router = nn.Linear(d_in, K, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for module in (self.A, self.B, self.router):
            module.to(base.weight.device)

    def forward(self, x):
        y = self.base(x)
        x = x.to(self.B.weight.dtype)
        g = self.router(x).softmax(-1)
        dropped = self.dropout(x)
        delta = sum(g[..., i : i + 1] * self.B(a(dropped)) for i, a in enumerate(self.A))
        return y + (delta * (ALPHA / R)).to(y.dtype)


def frozen_linear(d: int) -> nn.Linear:
    lin = nn.Linear(d, d)
    lin.requires_grad_(False)
    return lin


def ours(d: int, method: str, router: str | None) -> nn.Module:
    cfg = AdapterConfig(method=method, r=R, alpha=ALPHA, dropout=0.0, num_experts=K, router=router)
    layer = MultiLoraLinear(frozen_linear(d), cfg, "layer", RoutingState())
    nn.init.normal_(layer.lora_B, std=0.01)
    return layer


def peft_lora(d: int) -> nn.Module:
    holder = nn.Module()
    holder.lin = frozen_linear(d)
    inject_adapter_in_model(
        LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["lin"]), holder
    )
    return holder.lin


def variants(d: int) -> dict[str, nn.Module]:
    per_expert = PerExpertALoRA(frozen_linear(d))
    return {
        "frozen linear": frozen_linear(d),
        "PEFT LoRA": peft_lora(d),
        "our LoRA": ours(d, "lora", None),
        "our ALoRA": ours(d, "alora", "softmax"),
        "per-expert ALoRA": per_expert,
        "our HydraLoRA": ours(d, "hydralora", "softmax"),
    }


def step(module: nn.Module, x: torch.Tensor) -> None:
    module(x).sum().backward()


def measure(d: int, tokens: int, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    torch.manual_seed(0)
    mods = variants(d)
    x = torch.randn(tokens // 256, 256, d, requires_grad=True)  # activations that need gradients
    timers = {
        name: Timer("step(m, x)", globals={"step": step, "m": m, "x": x}, timer=clock)
        for name, m in mods.items()
    }
    for t in timers.values():  # warm-up
        t.timeit(2)
    times: dict[str, list[float]] = {name: [] for name in mods}
    order = list(timers)
    shuffler = random.Random(d)
    for _ in range(rounds):
        shuffler.shuffle(order)  # no variant always runs right after the same neighbour
        for name in order:
            times[name].append(timers[name].timeit(3).mean)
    return {name: statistics.median(v) for name, v in times.items()}


def report(d: int, med: dict[str, float]) -> dict:
    base = med["frozen linear"]
    over = {k: max(v - base, 1e-9) for k, v in med.items()}  # the adapter's own cost
    ratios = {
        "ALoRA / LoRA (whole layer)": med["our ALoRA"] / med["our LoRA"],
        "per-expert / ALoRA (whole layer)": med["per-expert ALoRA"] / med["our ALoRA"],
        "per-expert / ALoRA (adapter overhead)": over["per-expert ALoRA"] / over["our ALoRA"],
        "our LoRA / PEFT LoRA (whole layer)": med["our LoRA"] / med["PEFT LoRA"],
        "HydraLoRA / LoRA (whole layer)": med["our HydraLoRA"] / med["our LoRA"],
    }
    print(f"\nd = {d}  (ms per forward+backward; ratio to the frozen linear)")
    for name, t in med.items():
        print(f"  {name:<18} {t * 1e3:9.2f} ms   {t / base:5.2f} x")
    for name, value in ratios.items():
        print(f"  {name:<40} {value:5.2f}")
    return {"d": d, "ms": {k: v * 1e3 for k, v in med.items()}, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="576,2048,4096")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread, timed by this process's CPU time: steadier than wall time on a busy shared machine",
    )
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    threads, clock = (1, time.process_time) if args.cpu_time else (args.threads, time.perf_counter)
    torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}, {threads} threads, {'CPU' if args.cpu_time else 'wall'} time, "
        f"{args.tokens} tokens, r={R}, K={K}, fp32, dropout 0"
    )
    results = [report(d, measure(d, args.tokens, args.rounds, clock)) for d in map(int, args.dims.split(","))]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
