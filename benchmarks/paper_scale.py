"""Training steps at the paper's scale: a model of LLaMA-2-7B's shape (bundled config, random
weights built directly on the device, bfloat16), batch 16 x 256 tokens, r = 8 on q_proj and o_proj.

Variants, each with and without activation checkpointing, share one base model (adapters are
swapped in and out) and are interleaved round by round in a shuffled order (round 0 is warm-up);
each reports its median step time and its peak memory:

    PEFT LoRA, our LoRA, our ALoRA (K = 3, softmax router), the reference's per-expert loop
    (B applied K times), our HydraLoRA, our MoLA; our ALoRA with a task router on a single-task
    batch and on a mixed-task batch (each example its own task, one forward pass); and our LoRA
    computing in float32 (the input cast to float32, as before adapters computed in the input's
    dtype) to price that cast, and our LoRA under torch.autocast (bfloat16), the other way to
    avoid it.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU. On a CPU it is the process's peak
resident set size (Linux VmHWM, reset through /proc/self/clear_refs before each measurement, with
glibc returning every freed block of 64 KiB or more to the system). Both are reported as the peak
over the memory in use when the measurement started (base weights and the batch), and the total.

``--federated`` adds the federated figure at the same shape: one base model, 8 clients' LoRA
states (Fed-ALoRA through the in-process simulator), the per-client state swap and the per-round
overhead against a local step.

    python benchmarks/paper_scale.py                                  # a GPU: llama-2-7b, bf16
    python benchmarks/paper_scale.py --shape tiny --batch 2 --tokens 32 --rounds 1 --steps 1
    python benchmarks/paper_scale.py --shape llama-2-7b --set num_hidden_layers=4 hidden_size=1024 \\
        intermediate_size=2752 num_attention_heads=8 num_key_value_heads=8 --batch 4 --tokens 128
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from layer_speed import ALPHA, K, PerExpertALoRA, R
from train_step import TARGETS, ours, peft, step_time, unpeft
from transformers import AutoModelForCausalLM

from asymlora.adapters import find_target_modules
from asymlora.federated.comm import load_config
from asymlora.models import BASE_DTYPES, DEVICES, base_dtype, resolve_device, tiny_config
from asymlora.train.activations import set_activation_checkpointing

DROPOUT = 0.05  # the paper's
GiB = 2**30


# --- the model ------------------------------------------------------------------------------------
def shape_config(shape: str, overrides: list[str]):
    """The transformers config of ``shape`` (``tiny``, a bundled name, a config.json or a hub id),
    with ``key=value`` overrides (integers, e.g. num_hidden_layers=2)."""
    config = tiny_config("tiny-llama", vocab_size=512) if shape == "tiny" else load_config(shape)
    for item in overrides:
        key, _, value = item.partition("=")
        if not hasattr(config, key) or not value.isdigit():
            raise ValueError(f"--set {item}: give KEY=INTEGER with a field of the {shape} config")
        setattr(config, key, int(value))
    return config


def build_base(config, dtype: torch.dtype, device: torch.device):
    """Random weights (seeded), built on ``device`` in ``dtype``: nothing is read from disk, and a
    7B model never exists in float32 (the default dtype works with every transformers release)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


# --- the variants -----------------------------------------------------------------------------------
def per_expert(base):
    """The reference's per-expert ALoRA layer in every target module."""
    for name, module in find_target_modules(base, TARGETS).items():
        base.set_submodule(name, PerExpertALoRA(module, dropout=DROPOUT))
    return base


def un_per_expert(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, PerExpertALoRA):
            model.set_submodule(name, module.base)
    return model


def float32_compute(model):
    """Our LoRA as it computed before: the layer input cast to float32, the output cast back."""

    def forward(layer, x, *args, **kwargs):
        y = layer.base_layer(x, *args, **kwargs)
        return y + layer.delta(x.float()).to(y.dtype)

    for layer in model.adapted.values():
        layer.forward = types.MethodType(forward, layer)
    return model


def under_autocast(model):
    """Our LoRA with every forward under ``torch.autocast`` in bfloat16, as the training loop runs
    it on a GPU (``train.precision: auto`` or ``bf16``): over a bfloat16 base the layer already
    computes in bfloat16, so this prices autocast's own dispatch and the ops it runs in float32."""
    forward, device = model.forward, next(model.parameters()).device.type

    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    return model


def unload(model):
    return model.unload()


@dataclass
class Variant:
    attach: Callable
    detach: Callable
    inputs: Callable[[int], dict] = field(default=lambda batch: {})


def variants() -> dict[str, Variant]:
    def task_ids(mixed: bool):
        return lambda batch: {
            "task_ids": torch.arange(batch) % K if mixed else torch.zeros(batch, dtype=torch.long)
        }

    def our(method: str, router: str = "softmax"):
        return lambda b: ours(b, method, R, K, router)

    return {
        "PEFT LoRA": Variant(lambda b: peft(b, R), unpeft),
        "our LoRA": Variant(our("lora"), unload),
        "our ALoRA": Variant(our("alora"), unload),
        "per-expert ALoRA": Variant(per_expert, un_per_expert),
        "our HydraLoRA": Variant(our("hydralora"), unload),
        "our MoLA": Variant(our("mola"), unload),
        "task-routed ALoRA single-task": Variant(our("alora", "task"), unload, task_ids(mixed=False)),
        "task-routed ALoRA mixed-task": Variant(our("alora", "task"), unload, task_ids(mixed=True)),
        "our LoRA fp32-compute": Variant(lambda b: float32_compute(our("lora")(b)), unload),
        "our LoRA autocast": Variant(lambda b: under_autocast(our("lora")(b)), unload),
    }


# --- measuring ------------------------------------------------------------------------------------
class PeakMemory:
    """The peak memory of what runs between ``reset()`` and ``read()``, in bytes: (above the
    memory in use at reset, total)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start = 0
        if not self.cuda:
            self.libc = ctypes.CDLL("libc.so.6")
            # M_MMAP_THRESHOLD (-3) fixed at 64 KiB: large blocks go back to the system when freed
            self.libc.mallopt(-3, 64 * 1024)

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set size starts again from the current one
            self.start = _status("VmRSS")

    def read(self) -> tuple[int, int]:
        peak = torch.cuda.max_memory_allocated() if self.cuda else _status("VmHWM")
        return peak - self.start, peak


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


# What each variant's two adapted modules per block keep for the backward pass, per token, in units
# of the hidden size h (bfloat16 base; counted by saved_bytes at h = 1024): computing in the input's
# dtype, the dropout noise and the dropped-out input of A; a learned router also keeps its input;
# computing in float32 (PEFT, and our layer before) keeps float32 copies.
ADAPTER_KEEPS_H = {
    "PEFT LoRA": 12,
    "our LoRA": 6,
    "our ALoRA": 8,
    "our HydraLoRA": 8,
    "our MoLA": 8,
    "task-routed ALoRA single-task": 6,
    "task-routed ALoRA mixed-task": 6,
    "our LoRA fp32-compute": 12,
}


def predicted_peak(config, tokens: int, variant: str, trainable: int, checkpointing: bool) -> float:
    """The peak memory of a training step above the base weights, by arithmetic (NaN for a variant
    without an ADAPTER_KEEPS_H entry). Per token and block, a bfloat16 Llama block keeps its two
    RMSNorm inputs in float32 (8h bytes), q, k, v and the attention output (4h + 4 h_kv), the MLP's
    gate, up and SiLU outputs (6 m), and the adapters' share. The loss keeps float32 log-probabilities
    and its backward holds three float32 (tokens, vocab) tensors at once (12 V bytes per token), at
    the start of the backward pass, when every block's activations are still held; checkpointing
    holds each block's bfloat16 input (2h) instead, and recomputes one block at a time later. The
    adapters' weights, gradients and AdamW moments are float32 (16 bytes per parameter)."""
    if variant not in ADAPTER_KEEPS_H:
        return float("nan")
    h, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h_kv = config.num_key_value_heads * (h // config.num_attention_heads)
    block = tokens * (8 * h + 4 * h + 4 * h_kv + 6 * m + ADAPTER_KEEPS_H[variant] * h)
    head = tokens * 12 * v
    layers = config.num_hidden_layers
    held = layers * tokens * 2 * h + max(head, block) if checkpointing else layers * block + head
    return held + 16 * trainable


def saved_bytes(model, batch, inputs: dict) -> int:
    """Bytes autograd keeps for the backward pass of one training forward (each storage once,
    the frozen weights left out): the activations, counted exactly."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch, **inputs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def clock_for(device: torch.device, cpu_time: bool = False) -> Callable[[], float]:
    """Wall time (after the GPU finishes its queued work), or this process's CPU time."""
    if cpu_time:
        return time.process_time
    if device.type != "cuda":
        return time.perf_counter

    def synced() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return synced


def measure(base, chosen: dict[str, Variant], checkpointing: list[bool], args, device) -> dict:
    """Every (variant, checkpointing) cell: median step time over the rounds and peak memory."""
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.tokens), device=device,
                          generator=torch.Generator(device).manual_seed(0))  # fmt: skip
    cells = [(name, ckpt) for name in chosen for ckpt in checkpointing]
    times: dict[tuple, list[float]] = {cell: [] for cell in cells}
    peaks: dict[tuple, tuple[int, int]] = {}
    saved: dict[tuple, int] = {}
    trainable: dict[str, int] = {}
    memory, clock, order = PeakMemory(device), clock_for(device, args.cpu_time), list(cells)
    for rnd in range(args.rounds + 1):
        random.Random(rnd).shuffle(order)
        for name, ckpt in order:
            variant = chosen[name]
            model = variant.attach(base)
            set_activation_checkpointing(model, ckpt)
            inputs = {k: v.to(device) for k, v in variant.inputs(args.batch).items()}
            if not rnd:
                model.train()
                try:
                    saved[(name, ckpt)] = saved_bytes(model, batch, inputs)
                except torch.cuda.OutOfMemoryError:  # too big for this GPU: NaN
                    saved[(name, ckpt)] = float("nan")
                trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            memory.reset()
            try:
                seconds = step_time(model, batch, args.steps, clock, **inputs)
            except torch.cuda.OutOfMemoryError:
                seconds = float("nan")
            peak = memory.read()
            base = variant.detach(model)
            set_activation_checkpointing(base, False)
            peaks[(name, ckpt)] = max(peaks.get((name, ckpt), (0, 0)), peak)
            if rnd:
                times[(name, ckpt)].append(seconds)
        if rnd:
            print(f"round {rnd}: " + ", ".join(f"{n}{' +ckpt' if c else ''} {times[(n, c)][-1]:.3f}s"
                                             for n, c in cells), flush=True)  # fmt: skip
    return {
        f"{name}{' | checkpointing' if ckpt else ''}": {
            "seconds": statistics.median(times[(name, ckpt)]) if args.rounds else float("nan"),
            "rounds_s": times[(name, ckpt)],
            "peak_above_start_gib": peaks[(name, ckpt)][0] / GiB,
            "peak_total_gib": peaks[(name, ckpt)][1] / GiB,
            "saved_for_backward_gib": saved[(name, ckpt)] / GiB,
            "predicted_peak_above_start_gib": predicted_peak(
                base.config, args.batch * args.tokens, name, trainable[name], ckpt
            )
            / GiB,
        }
        for name, ckpt in cells
    }


RATIOS = [  # (numerator, denominator): step time and peak memory, in each checkpointing setting
    ("our ALoRA", "PEFT LoRA"),
    ("our LoRA", "PEFT LoRA"),
    ("our ALoRA", "our LoRA"),
    ("per-expert ALoRA", "our ALoRA"),
    ("our HydraLoRA", "our ALoRA"),
    ("our MoLA", "our ALoRA"),
    ("task-routed ALoRA mixed-task", "task-routed ALoRA single-task"),
    ("our LoRA fp32-compute", "our LoRA"),
    ("our LoRA autocast", "our LoRA"),
]


def ratios(cells: dict) -> dict[str, float]:
    out = {}
    for suffix in ("", " | checkpointing"):
        for num, den in RATIOS:
            a, b = cells.get(num + suffix), cells.get(den + suffix)
            if a and b:
                out[f"time {num} / {den}{suffix}"] = a["seconds"] / b["seconds"]
                out[f"memory {num} / {den}{suffix}"] = a["peak_above_start_gib"] / b["peak_above_start_gib"]
    for name in {key.split(" | ")[0] for key in cells}:
        on, off = cells.get(name + " | checkpointing"), cells.get(name)
        if on and off:
            out[f"time {name}: checkpointing / none"] = on["seconds"] / off["seconds"]
    return out


def cast_profile(base, batch, chosen: dict[str, Variant]) -> dict[str, dict[str, float]]:
    """Each variant's training step under the profiler: the share of the step's time spent in dtype
    casts (aten::_to_copy and what it calls). On a CPU that is CPU time, which contention inflates
    like everything else, so the share is steadier than a difference of step times on a busy
    machine; on a GPU it is the kernels' device time (the CPU only launches them there)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = batch.device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    clock = "device" if cuda else "cpu"  # the profiler's fields: self_device_time_total, ...
    out = {}
    for name, variant in chosen.items():
        model = variant.attach(base)
        step_time(model, batch, 1)  # warm-up
        with profile(activities=activities) as prof:
            step_time(model, batch, 1)
        events = prof.key_averages()
        # On a GPU a kernel's time is counted on its own event and again on the op that launched
        # it: the step's total sums the kernels alone; a cast's time is its op's (what it launched).
        counted = [e for e in events if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(getattr(e, f"self_{clock}_time_total") for e in counted)
        casts = sum(getattr(e, f"{clock}_time_total") for e in events if e.key == "aten::_to_copy")
        out[name] = {
            "clock": clock,
            "step_s": total / 1e6,
            "cast_s": casts / 1e6,
            "cast_share": casts / total,
        }
        base = variant.detach(model)
    return out


# --- the federated figure ---------------------------------------------------------------------------
def federated_figure(base, args, device, clients: int = 8) -> dict:
    """One base model and ``clients`` clients' LoRA states (Fed-ALoRA, the in-process simulator):
    rounds of 1 and of 2 local steps per client, alternated; the difference is ``clients`` local
    steps, the rest of a round is its overhead (state swaps, fresh optimizers, upload checks,
    aggregation, downloads). The swap alone: loading one client's state into the shared model."""
    from asymlora.adapters import AdapterConfig
    from asymlora.engines import Client, LocalSimulator
    from asymlora.federated import get_method
    from asymlora.train import TrainConfig
    from asymlora.train.batches import Encoded

    gen = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, base.config.vocab_size, (args.tokens,), generator=gen).tolist()
                for _ in range(args.batch)]  # fmt: skip
    encoded = [[Encoded(ids, ids, 0) for ids in examples]]
    sim = LocalSimulator(
        base,
        get_method("fedalora"),
        [Client(f"c{i}", encoded, R, ALPHA) for i in range(clients)],
        AdapterConfig(method="lora", target_modules=TARGETS, dropout=DROPOUT),
        TrainConfig(steps=1, batch_size=args.batch, lr=1e-4, max_length=args.tokens, schedule="constant"),
    )
    clock, rounds = clock_for(device, args.cpu_time), {1: [], 2: []}
    for rnd in range(args.rounds + 1):
        for steps in (1, 2):
            sim.train_cfg.steps = steps
            t0 = clock()
            sim.run_round()
            if rnd:
                rounds[steps].append(clock() - t0)
    swaps = []
    for i in range(clients):
        t0 = clock()
        sim.load_client(i)
        swaps.append(clock() - t0)
    one, two = statistics.median(rounds[1]), statistics.median(rounds[2])
    step = (two - one) / clients
    state_bytes = sum(t.numel() * t.element_size() for t in sim.states[0].values())
    return {
        "clients": clients,
        "round_1_step_s": one,
        "round_2_steps_s": two,
        "local_step_s": step,
        "round_overhead_s": one - clients * step,
        "round_overhead_in_local_steps": (one - clients * step) / step,
        "swap_s": statistics.median(swaps),
        "swap_in_local_steps": statistics.median(swaps) / step,
        "client_state_mib": state_bytes / 2**20,
    }


# --- the report -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--shape", default="llama-2-7b", help="tiny, llama-2-7b, llama-3-8b, qwen2-7b, or a config.json"
    )
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT", help="override config fields")
    ap.add_argument("--dtype", default="bfloat16", choices=list(BASE_DTYPES))
    ap.add_argument("--device", default="auto", choices=list(DEVICES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (0: memory only)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    ap.add_argument("--federated", action="store_true", help="also the federated figure (8 clients)")
    ap.add_argument(
        "--cast-profile", action="store_true", help="also the dtype casts' share of a step (profiler)"
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU only: one thread, timed by this process's CPU time (busy machines)",
    )
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.cpu_time and device.type != "cpu":
        ap.error("--cpu-time times a CPU run; on a GPU the wall time is what counts")
    if args.threads or args.cpu_time:
        torch.set_num_threads(1 if args.cpu_time else args.threads)
    every = variants()
    names = [n.strip() for n in args.variants.split(",")] if args.variants else list(every)
    unknown = [n for n in names if n not in every]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(every)}")
    checkpointing = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]

    try:
        config = shape_config(args.shape, args.set)
    except ValueError as err:
        ap.error(str(err))
    base = build_base(config, base_dtype(args.dtype), device)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": str(device),
        "gpu": gpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": "process CPU time" if args.cpu_time else "wall",
        "shape": args.shape,
        "overrides": args.set,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "dtype": args.dtype,
        "batch": args.batch,
        "tokens": args.tokens,
        "base_weights_gib": weights / GiB,
        "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)",
    }
    print(json.dumps(header))
    cells = measure(base, {n: every[n] for n in names}, checkpointing, args, device)
    out = {**header, "cells": cells, "ratios": ratios(cells)}
    save(out, args.json)
    for name, cell in cells.items():
        print(f"  {name:<42} {cell['seconds']:8.3f} s   peak +{cell['peak_above_start_gib']:.3f} GiB"
              f" (total {cell['peak_total_gib']:.3f} GiB), saved for backward"
              f" {cell['saved_for_backward_gib']:.3f} GiB, predicted peak +{cell['predicted_peak_above_start_gib']:.3f}"
              " GiB")  # fmt: skip
    for name, value in out["ratios"].items():
        print(f"  {name:<62} {value:6.3f}")
    if args.cast_profile:
        batch = torch.randint(0, config.vocab_size, (args.batch, args.tokens), device=device)
        out["cast_profile"] = cast_profile(
            base, batch, {n: every[n] for n in ("our LoRA", "our LoRA fp32-compute")}
        )
        print("casts:", json.dumps(out["cast_profile"]))
        save(out, args.json)
    if args.federated:
        out["federated"] = federated_figure(base, args, device)
        print("federated:", json.dumps(out["federated"]))
        save(out, args.json)
    return 0


def save(out: dict, path: str | None) -> None:
    """Write what is measured so far (each part as it finishes: a later failure keeps it)."""
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
