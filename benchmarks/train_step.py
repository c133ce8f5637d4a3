"""Whole-model training step time on a real model: our ALoRA (K=3) and our LoRA against PEFT's
LoRA at the same rank. One optimizer step = forward + backward + AdamW on a batch of random tokens.
The variants share one base model (adapters are swapped in and out) and are interleaved round by
round; each reports its median.

    python benchmarks/train_step.py [--model smollm2-135m] [--batch 8] [--tokens 128] [--rounds 5]

``--mc`` times instead the loss path of ``asymlora train`` on multiple-choice-shaped batches (real
commonsense prompts with their short answers, our LoRA): the logits of every position of a
right-padded batch (the loss before the change) against the logits of the labelled tail of a
left-padded batch only (``asymlora.train.loop.token_loss_sum``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from asymlora import wrap
from asymlora.data.registry import get_task
from asymlora.data.task import continuation
from asymlora.models import load_model
from asymlora.train.batches import IGNORE, Example, collate, encode, length_groups
from asymlora.train.loop import token_loss_sum

TARGETS = ["q_proj", "o_proj"]  # the paper's commonsense targets


def ours(base, method: str, r: int, k: int, router: str = "softmax"):
    extra = {} if method == "lora" else {"num_experts": k, "router": router}
    return wrap(base, method=method, r=r, alpha=2 * r, dropout=0.05, target_modules=TARGETS, **extra)


def peft(base, r: int):
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=TARGETS))


def unpeft(model):
    return model.unload()


def step_time(model, batch, steps: int, clock=time.perf_counter, **inputs) -> float:
    """Median time of ``steps`` optimizer steps (a fresh AdamW; ``inputs`` go to the model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for _ in range(steps):
        t0 = clock()
        model(input_ids=batch, labels=batch, **inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(clock() - t0)
    return statistics.median(times)


def full_logits_loss(model, items, pad_id):
    """The loss as it was computed before: right padding, vocabulary logits at every position."""
    batch = collate(items, pad_id)  # left-padded: move every row's padding to its end
    pads = (batch["attention_mask"] == 0).sum(1)
    ids, labels, mask = (
        torch.stack([row.roll(-int(n)) for row, n in zip(batch[key], pads, strict=True)])
        for key in ("input_ids", "labels", "attention_mask")
    )
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def mc_batches(tokenizer, n_batches: int, batch: int, max_length: int, seed: int = 0):
    """Batches of real training examples of three commonsense tasks, mixed, encoded as train does."""
    tasks = [get_task(name) for name in ("social_iqa", "strategyqa", "winowhy")]
    pool = [
        Example(task.prompt(ex), continuation(task.target(ex)))
        for task in tasks
        for ex in task.splits(0)["train"].select(range(200))
    ]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    encoded = [encode(tokenizer, pool[i], max_length) for i in order[: n_batches * batch]]
    return [encoded[k * batch : (k + 1) * batch] for k in range(n_batches)]


def mc_step_times(args) -> dict:
    """Median step time of the two loss paths on the same multiple-choice batches, interleaved."""
    base, tokenizer = load_model(args.model)
    model = ours(base, "lora", args.rank, 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = mc_batches(tokenizer, args.rounds + 1, args.batch, args.tokens)
    paths = {
        "all logits, right-padded (before)": lambda items: full_logits_loss(model, items, pad),
        "labelled tail, left-padded (now)": lambda items: token_loss_sum(model, collate(items, pad)),
        "labelled tail, by length (now)": lambda items: sum(
            token_loss_sum(model, collate(group, pad)) for group in length_groups(items)
        ),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    clock = time.process_time if args.cpu_time else time.perf_counter
    times = {name: [] for name in paths}
    model.train()
    tokens = statistics.fmean(len(e.input_ids) for b in batches for e in b)
    print(
        f"{args.model}: multiple-choice batches of {args.batch}, {tokens:.0f} tokens per example on average"
    )
    for rnd, items in enumerate(batches):  # round 0 is warm-up
        for name, loss_of in paths.items():
            t0 = clock()
            loss_of(items).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rnd:
                times[name].append(clock() - t0)
        if rnd:
            print(f"round {rnd}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in paths))
    med = {n: statistics.median(v) for n, v in times.items()}
    before = next(iter(med.values()))
    ratios = {f"before / {name}": before / t for name, t in list(med.items())[1:]}
    for name, ratio in ratios.items():
        print(f"  speed-up {name}: {ratio:.3f}")
    padded = sum(len(b) * max(len(e.input_ids) for e in b) for b in batches)
    real = sum(len(e.input_ids) for b in batches for e in b)
    print(f"  padding: {100 * (1 - real / padded):.0f}% of the tokens of a padded batch")
    return {"seconds": med, "ratios": ratios, "padding_share": 1 - real / padded, "args": vars(args)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument(
        "--cpu-time", action="store_true", help="one thread, timed by process CPU time (busy machines)"
    )
    ap.add_argument("--mc", action="store_true", help="time the loss paths on multiple-choice batches")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
    if args.mc:
        result = mc_step_times(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    base, _ = load_model(args.model)
    batch = torch.randint(
        0, base.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    variants = {
        "PEFT LoRA": (lambda b: peft(b, args.rank), unpeft),
        "our LoRA": (lambda b: ours(b, "lora", args.rank, 1), lambda m: m.unload()),
        "our ALoRA": (lambda b: ours(b, "alora", args.rank, args.experts), lambda m: m.unload()),
    }
    times = {name: [] for name in variants}
    print(
        f"{args.model}: batch {args.batch} x {args.tokens} tokens, r={args.rank}, K={args.experts}, targets {TARGETS}, {torch.get_num_threads()} threads"
    )
    for rnd in range(args.rounds + 1):  # round 0 is warm-up
        for name, (attach, detach) in variants.items():
            model = attach(base)
            t = step_time(model, batch, args.steps, clock)
            base = detach(model)
            if rnd:
                times[name].append(t)
        if rnd:
            print(f"round {rnd}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in variants))
    med = {n: statistics.median(v) for n, v in times.items()}
    ratios = {
        "our ALoRA / our LoRA": med["our ALoRA"] / med["our LoRA"],
        "our ALoRA / PEFT LoRA": med["our ALoRA"] / med["PEFT LoRA"],
        "our LoRA / PEFT LoRA": med["our LoRA"] / med["PEFT LoRA"],
    }
    for n, t in med.items():
        print(f"  {n:<10} {t:.3f} s per step (median of {args.rounds} rounds)")
    for n, v in ratios.items():
        print(f"  {n:<24} {v:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": med, "ratios": ratios, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
