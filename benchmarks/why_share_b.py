"""Why share B: the paper's Figures 1 to 3 at CPU scale (issue 6).

1. Single-task LoRA adapters on two tasks x two seeds, each saved at initialisation, after a few
   steps ("early") and at the end; subspace similarity (phi) of A and of B, layer by layer, for
   three pairings: different tasks / same seed, same task / different seeds, different tasks /
   different seeds.
2. Change during training: magnitude and direction change of A and of B (``analysis.change``).
3. Gradients: a task-routed model sharing A (HydraLoRA-shaped) and one sharing B (ALoRA-shaped),
   trained on both tasks; per-task gradient norms and conflicts (``analysis.run_gradient_experiment``).

Finished trainings are skipped (a run folder with adapter/ is done; an interrupted one resumes from
its checkpoint), and the gradient result is reused when its settings match, so a re-run is cheap.

    python benchmarks/why_share_b.py [--model smollm2-135m] [--tasks social_iqa,strategyqa]
        [--seeds 0,1] [--steps 30] [--batch-size 8] [--threads 1] [--work runs/why_share_b]
        [--figures docs/figures/analysis]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from asymlora import analysis
from asymlora.adapters import AdapterConfig, save_adapter, wrap
from asymlora.analysis.sharing import GradientExperiment, run_gradient_experiment
from asymlora.data import training_examples
from asymlora.data.registry import get_task
from asymlora.models import load_model
from asymlora.train import TrainConfig, train

PAIRINGS = {
    "diff_task_same_seed": "different tasks, same seed",
    "same_task_diff_seed": "same task, different seeds",
    "diff_task_diff_seed": "different tasks, different seeds",
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- 1. single-task LoRA runs ---------------------------------------------------------------------


def train_single(args, task: str, seed: int, run: Path) -> None:
    """A single-task LoRA on ``task`` with adapter and batch seed ``seed``: adapter_init/,
    adapter_early/ (after ``args.early`` steps), adapter/ (the end). Skipped when adapter/ exists."""
    if (run / "adapter").is_dir():
        print(f"  {run.name}: done, skipped")
        return
    examples = training_examples([get_task(task)])
    base, tokenizer = load_model(args.model)
    config = AdapterConfig(method="lora", r=args.r, alpha=2 * args.r, target_modules=args.targets, seed=seed)
    model = wrap(base, config)
    if not (run / "adapter_init").is_dir():
        save_adapter(model, run / "adapter_init")
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        warmup_steps=args.warmup,
        seed=seed,
        save_every=args.save_every,
    )

    def on_step(step: int, _: dict) -> None:
        if step == args.early:
            save_adapter(model, run / "adapter_early")

    t0, c0 = time.perf_counter(), cpu_seconds()
    last = train(model, tokenizer, examples, cfg, run, resume=True, on_step=on_step)
    save_adapter(model, run / "adapter")
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    print(f"  {run.name}: {args.steps} steps, last loss {last.get('loss', float('nan')):.3f}, "
          f"{wall:.0f} s wall, {cpu:.0f} s CPU")  # fmt: skip


# --- 2. similarity -------------------------------------------------------------------------------


def pairs_of(runs: dict[tuple[str, int], Path]) -> dict[str, list[tuple[tuple[str, int], tuple[str, int]]]]:
    out: dict[str, list] = {k: [] for k in PAIRINGS}
    for x, y in combinations(sorted(runs), 2):
        same_task, same_seed = x[0] == y[0], x[1] == y[1]
        if same_seed and not same_task:
            out["diff_task_same_seed"].append((x, y))
        elif same_task and not same_seed:
            out["same_task_diff_seed"].append((x, y))
        elif not same_task and not same_seed:
            out["diff_task_diff_seed"].append((x, y))
    return out


def by_layer(results: list[dict[str, Any]], kind: str, key: str) -> dict[int, float]:
    """Mean of ``row[key]`` over the modules of each layer and over the results."""
    acc: dict[int, list[float]] = {}
    for result in results:
        for row in result[kind]["modules"]:
            if row[key] is not None and row["layer"] is not None:
                acc.setdefault(row["layer"], []).append(row[key])
    return {layer: sum(v) / len(v) for layer, v in sorted(acc.items())}


def overall(per_layer: dict[int, float]) -> float | None:
    return sum(per_layer.values()) / len(per_layer) if per_layer else None


def similarity_stage(args, runs) -> dict[str, Any]:
    report: dict[str, Any] = {"i": args.i, "j": args.j, "pairings": {}}
    d = {}
    for name, pairs in pairs_of(runs).items():
        results = [
            analysis.similarity(runs[x] / "adapter", runs[y] / "adapter", i=args.i, j=args.j)
            for x, y in pairs
        ]
        inits = [
            analysis.similarity(runs[x] / "adapter_init", runs[y] / "adapter_init", i=args.i, j=args.j)
            for x, y in pairs
        ]
        entry = {"label": PAIRINGS[name], "pairs": [[f"{x[0]}/s{x[1]}", f"{y[0]}/s{y[1]}"] for x, y in pairs]}
        for kind in ("A", "B"):
            layers = by_layer(results, kind, "mean")
            entry[kind] = {"by_layer": layers, "mean": overall(layers)}
        entry["A_at_init"] = overall(by_layer(inits, "A", "mean"))
        report["pairings"][name] = entry
        if results:
            first = analysis.load_weights(runs[pairs[0][0]] / "adapter")
            module = first.modules[0]
            d = {"A": first.blocks(module, "A")[0].shape[1], "B": first.blocks(module, "B")[0].shape[1]}
    # two random subspaces of dims i and j in R^d: E[phi] = max(i, j) / d
    report["chance"] = {k: max(args.i, args.j) / v for k, v in d.items()}
    return report


def plot_similarity(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("A", "B"), strict=True):
        for (_name, entry), style in zip(report["pairings"].items(), ("-o", "--s", ":^"), strict=False):
            layers = entry[kind]["by_layer"]
            ax.plot([int(k) for k in layers], list(layers.values()), style, ms=3,
                    label=f"{entry['label']} (mean {entry[kind]['mean']:.2f})")  # fmt: skip
        ax.axhline(report["chance"][kind], color="grey", lw=0.8, ls="--", label="two random subspaces")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"phi(i={report['i']}, j={report['j']})")
        ax.set_title(f"{kind} ({'row' if kind == 'A' else 'column'} space), mean over q_proj/o_proj")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Figure 1: subspace similarity of single-task LoRAs (SmolLM2-135M)", fontsize="medium")
    fig.savefig(path, dpi=120)


# --- 3. change -----------------------------------------------------------------------------------


def change_stage(runs) -> dict[str, Any]:
    from_init = [analysis.change(run / "adapter_init", run / "adapter") for run in runs.values()]
    early = [run for run in runs.values() if (run / "adapter_early").is_dir()]
    from_early = [analysis.change(run / "adapter_early", run / "adapter") for run in early]
    report: dict[str, Any] = {"runs": [str(r) for r in runs.values()], "runs_with_early": len(from_early)}
    for label, results in (("from_init", from_init), ("from_early", from_early)):
        entry = {}
        for kind in ("A", "B"):
            for key in ("mean_magnitude", "mean_direction"):
                layers = by_layer(results, kind, key)
                entry[f"{kind}_{key.removeprefix('mean_')}"] = {"by_layer": layers, "mean": overall(layers)}
        report[label] = entry
    return report


def plot_change(report: dict[str, Any], path: Path, early: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    series = [
        (axes[0], "from_init", "A_magnitude", "-o", "A: ||A-A0|| / ||A0||"),
        (axes[0], "from_init", "B_magnitude", "--s", "B: ||B-B0|| / ||A0|| (B0 = 0)"),
        (axes[1], "from_init", "A_direction", "-o", "A, from init"),
        (axes[1], "from_early", "A_direction", ":^", f"A, from step {early}"),
        (axes[1], "from_early", "B_direction", "--s", f"B, from step {early}"),
    ]
    for ax, when, key, style, label in series:
        layers = report[when][key]["by_layer"]
        if layers:
            ax.plot([int(k) for k in layers], list(layers.values()), style, ms=3,
                    label=f"{label} (mean {report[when][key]['mean']:.3g})")  # fmt: skip
    axes[0].set_ylabel("magnitude change")
    axes[1].set_ylabel("direction change: mean 1 - cos")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(
        "Figure 2: change of A and B during training (mean over runs and q_proj/o_proj)", fontsize="medium"
    )
    fig.savefig(path, dpi=120)


# --- 4. gradients --------------------------------------------------------------------------------


def gradient_stage(args, work: Path) -> dict[str, Any]:
    exp = GradientExperiment(
        model=args.model,
        steps=args.grad_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        seed=args.seeds[0],
        r=args.r,
        alpha=2 * args.r,
        target_modules=args.targets,
        examples=args.grad_examples,
        measure_every=args.measure_every,
    )
    settings = {"tasks": args.tasks, **dataclasses.asdict(exp)}
    cache = work / "gradients.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("settings") == settings:
            print("  gradients: done, reused")
            return cached
    tasks = [get_task(t) for t in args.tasks]
    results = {}
    for share in ("a", "b"):
        t0, c0 = time.perf_counter(), cpu_seconds()
        results[share] = run_gradient_experiment(tasks, share, exp, work / f"gradients_{share}")
        results[share]["wall_s"] = time.perf_counter() - t0
        results[share]["cpu_s"] = cpu_seconds() - c0
    report = {"settings": settings, "results": results}
    cache.write_text(json.dumps(report, indent=2) + "\n")
    return report


def plot_gradients(grad: dict[str, Any], path: Path) -> None:
    """Figure 3: the shared matrix's gradient norm per layer, and conflicting task pairs per layer,
    A shared vs B shared."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for res, style in zip(grad["results"].values(), ("-o", "--s"), strict=False):
        k = res["shared_matrix"]
        norms = by_layer([{"X": {"modules": res["modules"]}}], "X", f"mean_grad_norm_{k}")
        axes[0].plot([int(x) for x in norms], list(norms.values()), style, ms=3,
                     label=f"shared {k} ({res['method']}), mean {res['mean_grad_norm_shared']:.3g}")  # fmt: skip
        layers = sorted((x["layer"], x["conflicts"]) for x in res["layers"])
        axes[1].plot([x[0] for x in layers], [x[1] for x in layers], style, ms=3,
                     label=f"shared {k}: {res['total_conflicts']}/{res['total_pairs']} in all")  # fmt: skip
    pairs = max(x["pairs"] for res in grad["results"].values() for x in res["layers"])
    axes[0].set_ylabel("gradient norm of the shared matrix")
    axes[1].set_ylabel(f"conflicting task pairs (of {pairs} per layer)")
    axes[1].set_ylim(-0.1, pairs + 0.1)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    steps = next(iter(grad["results"].values()))["steps_measured"]
    fig.suptitle(f"Figure 3: per-task gradients on the shared matrix (2 tasks, q_proj/o_proj, steps {steps})",
                 fontsize="medium")  # fmt: skip
    fig.savefig(path, dpi=120)


# --- main ----------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def summary_lines(sim: dict, chg: dict, grad: dict) -> list[str]:
    lines = [f"similarity phi(i={sim['i']}, j={sim['j']}), mean over layers and pairs "
             f"(chance: A {sim['chance']['A']:.3f}, B {sim['chance']['B']:.3f}):"]  # fmt: skip
    for entry in sim["pairings"].values():
        lines.append(f"  {entry['label']:34} A {fmt(entry['A']['mean'])}  B {fmt(entry['B']['mean'])}"
                     f"  (A at init {fmt(entry['A_at_init'])})")  # fmt: skip
    fi, fe = chg["from_init"], chg["from_early"]
    lines.append("change, mean over layers and runs:")
    lines.append(
        f"  magnitude from init: A {fmt(fi['A_magnitude']['mean'])}, B {fmt(fi['B_magnitude']['mean'])}"
    )
    lines.append(f"  direction from init: A {fmt(fi['A_direction']['mean'])}, B n/a (B starts at 0)")
    lines.append(
        f"  from the early checkpoint: magnitude A {fmt(fe['A_magnitude']['mean'])}, "
        f"direction A {fmt(fe['A_direction']['mean'])}, B {fmt(fe['B_direction']['mean'])}"
    )
    lines.append("gradients (pooled over the measured steps):")
    for res in grad["results"].values():
        k = res["shared_matrix"]
        lines.append(
            f"  shared {k} ({res['method']}): mean grad norm of shared {k} {fmt(res['mean_grad_norm_shared'])} "
            f"(A {fmt(res['mean_grad_norm_A'])}, B {fmt(res['mean_grad_norm_B'])}); "
            f"conflicts {res['total_conflicts']}/{res['total_pairs']} module x step pairs"
        )
        per_step = ", ".join(
            f"step {s}: {snap['total_conflicts']}/{snap['total_pairs']}" for s, snap in res["by_step"].items()
        )
        lines.append(f"    by step: {per_step}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="social_iqa,strategyqa")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=30, help="training steps of each single-task LoRA")
    ap.add_argument("--early", type=int, default=3, help="step of the early checkpoint (B's direction)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=10, help="checkpoint interval (resume)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,o_proj")
    ap.add_argument("--i", type=int, default=None, help="top-i singular vectors (default r)")
    ap.add_argument("--j", type=int, default=None, help="top-j singular vectors (default r)")
    ap.add_argument("--grad-steps", type=int, default=20, help="training steps of the gradient models")
    ap.add_argument("--measure-every", type=int, default=10, help="gradient snapshot interval")
    ap.add_argument("--grad-examples", type=int, default=16, help="measurement examples per task")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default; 1 is cheapest in CPU time on a busy machine)",
    )
    ap.add_argument("--work", type=Path, default=Path("runs/why_share_b"))
    ap.add_argument("--figures", type=Path, default=Path("docs/figures/analysis"))
    args = ap.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.i = args.i or args.r
    args.j = args.j or args.r
    if len(set(args.tasks)) < 2 or len(set(args.seeds)) < 2:
        ap.error("needs at least two tasks and two seeds (for the three pairings)")
    if not 1 <= args.early < args.steps:
        ap.error(f"--early must be in 1..{args.steps - 1}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for t in args.tasks:
        get_task(t).examples()  # an unknown or unavailable task fails here, before any training

    t0, c0 = time.perf_counter(), cpu_seconds()
    print(f"1. single-task LoRA: {args.tasks} x seeds {args.seeds}, {args.steps} steps at batch "
          f"{args.batch_size}, max_length {args.max_length}, lr {args.lr}")  # fmt: skip
    runs = {}
    for task in args.tasks:
        for seed in args.seeds:
            runs[(task, seed)] = args.work / f"lora-{task}-s{seed}"
            train_single(args, task, seed, runs[(task, seed)])
    print("2. similarity and change")
    sim = similarity_stage(args, runs)
    chg = change_stage(runs)
    print(f"3. gradients: share A vs share B on {args.tasks}, {args.grad_steps} steps")
    grad = gradient_stage(args, args.work)

    figures = args.figures
    figures.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "figures")}
    (figures / "similarity.json").write_text(json.dumps({"settings": settings, **sim}, indent=2) + "\n")
    (figures / "change.json").write_text(json.dumps({"settings": settings, **chg}, indent=2) + "\n")
    (figures / "gradients.json").write_text(json.dumps(grad, indent=2) + "\n")
    plot_similarity(sim, figures / "fig1_similarity.png")
    plot_change(chg, figures / "fig2_change.png", args.early)
    plot_gradients(grad, figures / "fig3_gradients.png")
    analysis.plot_gradients(list(grad["results"].values()), figures / "fig3_gradients_by_module.png")
    lines = summary_lines(sim, chg, grad)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    lines.append(f"this invocation: {wall:.0f} s wall, {cpu:.0f} s CPU (skipped stages cost nothing)")
    (figures / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {figures}/: similarity.json, change.json, gradients.json, fig1-3 PNGs, summary.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
