"""asymlora's evaluator against lm-evaluation-harness, on the same model, questions and threads.

Each measurement runs in a process of its own (a worker), so its peak memory is its own: the worker
loads the model, builds the questions, then times one tool's scoring call, CPU seconds
(``time.process_time``) and wall seconds, and reports the per-question results. The two tools
alternate which runs first, task by task, and repeat ``--repeats`` times (the machine is shared and
noisy: compare the ratio, not the absolute times).

- Multiple choice: asymlora's ``continuation_logprobs`` against lm-eval's ``HFLM.loglikelihood``
  on the same (prompt, " " + choice) requests, as ``asymlora lm-eval-task`` writes them. The
  per-choice log-likelihoods must agree within 1e-5, and acc / acc_norm / acc_bytes computed as
  lm-eval computes them must be equal.
- Generation: asymlora's ``greedy_generate`` against ``HFLM.generate_until`` (greedy, the same stop
  strings and token budget). The texts are compared after stripping leading whitespace.

    python benchmarks/eval_speed.py [--questions 200] [--batch-size 16] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MC_TASKS = (  # reasoning-gym datasets (1000 problems), scored over their closed answer set
    "syllogism",  # 2 choices
    "zebra_puzzles",  # 4
    "family_relationships",  # 12
    "letter_counting",  # 13
    "gcd",  # 61
)
GEN_TASKS = ("letter_counting", "gcd", "basic_arithmetic", "gsm_symbolic")
ALONE = 32  # generation: the first questions also decoded one at a time by model.generate, to compare


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_mc(dataset: str, questions: int):
    """(prompts, choices per question, answers): the first test questions of a reasoning-gym dataset
    as asymlora scores it."""
    from asymlora.data.registry import reasoning_task
    from asymlora.eval import test_examples

    task = reasoning_task(dataset)
    examples = test_examples(task, limit=questions)
    return [task.prompt(ex) for ex in examples], list(examples["choices"]), list(examples["answer"])


def build_gen(dataset: str, questions: int):
    """(prompts, task): the first test questions of a reasoning-gym dataset with a numeric answer
    (gsm_symbolic: the registered task, 160 new tokens at most)."""
    from asymlora.data.registry import get_task, reasoning_task
    from asymlora.eval import test_examples

    task = get_task(dataset) if dataset == "gsm_symbolic" else reasoning_task(dataset, kind="numeric")
    examples = test_examples(task, limit=questions)
    return [task.prompt(ex) for ex in examples], task


def lm_eval_model(model, tok, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from asymlora.data.task import continuation
    from asymlora.eval import continuation_logprobs, greedy_generate
    from asymlora.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    if args.mode == "mc":
        prompts, choices, answers = build_mc(args.task, args.questions)
        pairs = [(p, continuation(c)) for p, cs in zip(prompts, choices, strict=True) for c in cs]
    else:
        prompts, task = build_gen(args.task, args.questions)
    if args.tool == "lm-eval":
        lm = lm_eval_model(model, tok, args.batch_size)
    before = rss_mb()
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.no_grad():
        if args.mode == "mc" and args.tool == "asymlora":
            flat = continuation_logprobs(model, tok, [p for p, _ in pairs], [c for _, c in pairs],
                                         batch_size=args.batch_size)  # fmt: skip
        elif args.mode == "mc":
            from lm_eval.api.instance import Instance

            requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
            flat = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        elif args.tool == "alone":
            outputs = [generate_alone(model, tok, p, task) for p in prompts[:ALONE]]
        elif args.tool == "asymlora":
            outputs = greedy_generate(model, tok, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop,
                                      batch_size=args.batch_size)  # fmt: skip
        else:
            from lm_eval.api.instance import Instance

            kwargs = {"until": list(task.stop), "max_gen_toks": task.max_new_tokens, "do_sample": False}
            requests = [Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(prompts)]
            outputs = [o.lstrip() for o in lm.generate_until(requests, disable_tqdm=True)]
    result = {
        "tool": args.tool,
        "task": args.task,
        "questions": len(prompts),
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "rss_before_mb": before,
        "peak_rss_mb": rss_mb(),
    }
    if args.mode == "mc":
        per_question, at = [], 0
        for cs in choices:
            per_question.append(flat[at : at + len(cs)])
            at += len(cs)
        result |= {"choices": len(choices[0]), "logliks": per_question, "answers": answers,
                   "choice_texts": [list(cs) for cs in choices]}  # fmt: skip
    else:
        result["outputs"] = outputs
    return result


def generate_alone(model, tok, prompt: str, task) -> str:
    """One question alone through ``model.generate`` (greedy, ending at the task's stop strings),
    cut as asymlora cuts it: the reference the batched decoder must equal token for token."""
    import torch

    from asymlora.eval.scoring import StopAtAnswerEnd, _cut

    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=task.max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                         stopping_criteria=[StopAtAnswerEnd(tok, task.stop, ids.shape[1])])  # fmt: skip
    return _cut(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), task.stop)[0]


def lm_eval_metrics(logliks: list[list[float]], choices: list[list[str]], answers: list[int]) -> dict:
    """acc, acc_norm (per character of the choice) and acc_bytes (per UTF-8 byte), as lm-eval's
    ``ConfigurableTask.process_results`` computes them (numpy argmax: the first on ties)."""
    import numpy as np

    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for lls, cs, gold in zip(logliks, choices, answers, strict=True):
        lls = np.array(lls)
        hits["acc"] += int(np.argmax(lls) == gold)
        hits["acc_norm"] += int(np.argmax(lls / np.array([float(len(c)) for c in cs])) == gold)
        hits["acc_bytes"] += int(np.argmax(lls / np.array([float(len(c.encode())) for c in cs])) == gold)
    return {k: 100 * v / len(answers) for k, v in hits.items()}


def run_worker(args: argparse.Namespace, tool: str, mode: str, task: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--tool", tool, "--mode", mode, "--task", task,
               "--model", args.model, "--questions", str(args.questions), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ASYMLORA_PROGRESS": "0"}  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {tool} {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_mc(ours: dict, theirs: dict) -> dict:
    from asymlora.eval.metrics import mc_metrics

    diff = max(abs(a - b) for qa, qb in zip(ours["logliks"], theirs["logliks"], strict=True)
               for a, b in zip(qa, qb, strict=True))  # fmt: skip
    expected = lm_eval_metrics(theirs["logliks"], theirs["choice_texts"], theirs["answers"])
    got = mc_metrics(ours["logliks"], ours["choice_texts"], ours["answers"])
    return {"max_abs_loglik_diff": diff, "lm_eval_metrics": expected, "asymlora_metrics": got,
            "metrics_equal": got.keys() == expected.keys() and all(abs(got[k] - expected[k]) < 1e-9 for k in got)}  # fmt: skip


def compare_gen(ours: dict, theirs: dict, alone: dict) -> dict:
    """How many texts equal lm-eval's (which does not skip a leading newline before its stop
    strings), and how many of the first ``ALONE`` equal each question decoded alone."""
    same = sum(a == b for a, b in zip(ours["outputs"], theirs["outputs"], strict=True))
    equal = sum(a == b for a, b in zip(ours["outputs"], alone["outputs"], strict=False))
    return {"same_as_lm_eval": same, "of": len(ours["outputs"]), "same_as_alone": equal,
            "alone_of": len(alone["outputs"])}  # fmt: skip


def measure(args: argparse.Namespace, mode: str, task: str, label: str, index: int) -> dict:
    runs = {"asymlora": [], "lm-eval": []}
    for repeat in range(args.repeats):
        order = ["asymlora", "lm-eval"] if (index + repeat) % 2 == 0 else ["lm-eval", "asymlora"]
        for tool in order:
            runs[tool].append(run_worker(args, tool, mode, task))
    ours, theirs = runs["asymlora"][0], runs["lm-eval"][0]
    cpu = {tool: sum(r["cpu_s"] for r in rs) / len(rs) for tool, rs in runs.items()}
    row = {
        "mode": mode,
        "task": label,
        "questions": ours["questions"],
        "asymlora_cpu_s": round(cpu["asymlora"], 2),
        "lm_eval_cpu_s": round(cpu["lm-eval"], 2),
        "speedup": round(cpu["lm-eval"] / cpu["asymlora"], 3),
        "asymlora_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["asymlora"])),
        "lm_eval_peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs["lm-eval"])),
        "rss_after_load_mb": round(ours["rss_before_mb"]),
        "repeats": [{tool: round(runs[tool][k]["cpu_s"], 2) for tool in runs} for k in range(args.repeats)],
    }
    if mode == "mc":
        row |= {"choices": ours["choices"]} | compare_mc(ours, theirs)
    else:
        row |= compare_gen(ours, theirs, run_worker(args, "alone", mode, task))
    row["questions_per_cpu_s"] = {tool: round(ours["questions"] / cpu[tool], 3) for tool in cpu}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=200, help="questions per task")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of both tools")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both tools")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per tool and task")
    parser.add_argument("--only", choices=("mc", "gen"), help="run one half only")
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    jobs = []
    if args.only != "gen":
        jobs += [("mc", name, name) for name in MC_TASKS]
    if args.only != "mc":
        jobs += [("gen", name, name) for name in GEN_TASKS]
    rows = []
    for index, (mode, task, label) in enumerate(jobs):
        row = measure(args, mode, task, label, index)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("lm_eval_metrics", "asymlora_metrics")}),
              flush=True)  # fmt: skip
    summary = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads,
               "questions": args.questions, "repeats": args.repeats, "cpu": cpu_kind(), "rows": rows}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def cpu_kind() -> str:
    """The processor's name and its widest vector extension (AVX-512 or AVX2)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?"
    )
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {vector}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
