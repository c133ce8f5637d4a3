"""Greedy generation time: transformers' ``model.generate`` (what asymlora.eval uses) against the
hand-written loop it replaced (tests/legacy_generation.py), on the first test prompts of each
nlp-multitask task, with each task's stop strings and token budget. Both must give the same text;
the two are interleaved task by task (the machine is shared and noisy) and the totals compared.

    python benchmarks/generation_speed.py [--model smollm2-135m] [--per-task 8] [--batch-size 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from asymlora.data.registry import get_suite  # noqa: E402
from asymlora.eval import greedy_generate, test_examples  # noqa: E402
from asymlora.models import load_model  # noqa: E402
from legacy_generation import legacy_greedy_generate  # noqa: E402


def timed(fn, *args, **kwargs) -> tuple[list[str], float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="model name for asymlora.models.load_model")
    parser.add_argument("--suite", default="nlp-multitask", help="suite whose tasks give the prompts")
    parser.add_argument("--per-task", type=int, default=8, help="test prompts per task")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    model, tok = load_model(args.model)
    rows, totals, mismatches = [], {"generate": 0.0, "legacy": 0.0}, 0
    for i, task in enumerate(get_suite(args.suite)):
        prompts = [task.prompt(ex) for ex in test_examples(task, limit=args.per_task)]
        options = {"max_new_tokens": task.max_new_tokens, "stop": task.stop, "batch_size": args.batch_size}
        order = [("generate", greedy_generate), ("legacy", legacy_greedy_generate)]
        results = {}
        for name, fn in order if i % 2 == 0 else order[::-1]:  # alternate which runs first
            results[name] = timed(fn, model, tok, prompts, **options)
        same = results["generate"][0] == results["legacy"][0]
        mismatches += not same
        row = {"task": task.name, "prompts": len(prompts), "same_text": same,
               **{f"{k}_s": round(v[1], 3) for k, v in results.items()}}  # fmt: skip
        rows.append(row)
        for k in totals:
            totals[k] += results[k][1]
        print(json.dumps(row), flush=True)
    summary = {
        "model": args.model,
        "suite": args.suite,
        "per_task": args.per_task,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "generate_s": round(totals["generate"], 2),
        "legacy_s": round(totals["legacy"], 2),
        "legacy_over_generate": round(totals["legacy"] / totals["generate"], 3),
        "tasks_with_different_text": mismatches,
        "tasks": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "tasks"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
