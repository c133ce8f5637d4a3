"""The ``asymlora`` command: a thin shell over the library.

Each subcommand is two small functions: ``add_<name>(subparsers)`` declares its flags and
``run_<name>(args)`` does the work; ``COMMANDS`` lists them, so a new subcommand is one more pair
and one more line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from asymlora.data.bigbench import BigBenchUnavailableError
from asymlora.data.registry import SUITES, get_suite, get_tasks, is_downloaded
from asymlora.data.task import Task
from asymlora.errors import UsageError, one_line, user_error
from asymlora.eval.report import TaskResult
from asymlora.threads import choose_threads, use_threads

# ---------------------------------------------------------------------------------------------
# asymlora tasks


def add_tasks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="list the task suites with their example counts")
    p.add_argument("--suite", choices=list(SUITES), help="only this suite")
    p.add_argument("--seed", type=int, default=0, help="split seed (the counts do not depend on it)")
    p.add_argument("--offline", action="store_true", help="do not download missing data; mark it instead")


def run_tasks(args: argparse.Namespace) -> int:
    suites = [args.suite] if args.suite else list(SUITES)
    for suite in suites:
        tasks = get_suite(suite)
        print(f"{suite} ({len(tasks)} tasks)")
        print(f"  {'task':44} {'kind':16} {'train':>6} {'test':>6}  source")
        for task in tasks:
            print("  " + _task_line(task, seed=args.seed, offline=args.offline))
        print()
    return 0


def _task_line(task: Task, *, seed: int, offline: bool) -> str:
    head = f"{task.name:44} {task.kind:16}"
    if offline and not is_downloaded(task):
        return f"{head} {'-':>6} {'-':>6}  {task.source} (not downloaded)"
    try:
        splits = task.splits(seed)
    except (BigBenchUnavailableError, ImportError) as err:
        return f"{head} {'-':>6} {'-':>6}  unavailable: {err}"
    return f"{head} {len(splits['train']):6d} {len(splits['test']):6d}  {task.source}"


# ---------------------------------------------------------------------------------------------
# asymlora eval


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a suite or on tasks; prints a table, writes JSON")
    p.add_argument("--model", required=True, help="smollm2-135m, tiny-llama, tiny-gpt2, a folder or a hub id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--suite", choices=list(SUITES), help="a named suite")
    what.add_argument("--task", action="append", help="a task name or a .json/.jsonl file (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="at most this many test examples per task")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024, help="prompt tokens kept (from the right)")
    p.add_argument(
        "--references", type=Path, help="JSON {task: score} or an earlier results.json, for delta-m"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default runs/eval/<model>-<suite>): results.json, results.md, tasks.jsonl",
    )


def run_eval(args: argparse.Namespace) -> int:
    from asymlora.eval.runner import check_eval_options, evaluate_tasks, majority_report
    from asymlora.models import load_model

    check_eval_options(args.limit, args.batch_size, args.max_length)
    tasks = get_suite(args.suite) if args.suite else get_tasks(args.task)
    references = read_references(args.references) if args.references else None
    for task in tasks:  # fetch / validate every task's data before loading the model
        task.examples()
    use_threads(log=lambda line: print(line, file=sys.stderr))
    model, tokenizer = load_model(args.model)
    out = args.out or Path("runs") / "eval" / _slug(f"{args.model}-{args.suite or '+'.join(args.task)}")
    out.mkdir(parents=True, exist_ok=True)
    per_task = out / "tasks.jsonl"
    per_task.write_text("", encoding="utf-8")

    def progress(result: TaskResult) -> None:  # each task is kept as soon as it is scored
        print(f"  {result.task}: {result.metric} {result.score:.2f} (n={result.n})", file=sys.stderr)
        with per_task.open("a", encoding="utf-8") as f:
            f.write(json.dumps(dataclasses.asdict(result)) + "\n")

    report = evaluate_tasks(
        model, tokenizer, tasks, references=references, progress=progress, limit=args.limit,
        seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
    )  # fmt: skip
    report.majority = majority_report(tasks, seed=args.seed, limit=args.limit)
    report.info = {"model": args.model, "suite": args.suite, "tasks_requested": args.task,
                   "limit": args.limit, "seed": args.seed}  # fmt: skip
    report.save(out / "results.json")
    (out / "results.md").write_text(report.to_markdown() + "\n", encoding="utf-8")
    print(report.to_markdown())
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def read_references(path: Path) -> dict[str, float]:
    """``{task: score}``, or the per-task scores of an earlier ``results.json``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: JSON or UTF-8
        raise UsageError(f"cannot read references {path}: {err}") from None
    scores = None
    try:
        if isinstance(data, dict) and isinstance(data.get("tasks"), list):
            scores = {t["task"]: float(t["score"]) for t in data["tasks"]}
        elif isinstance(data, dict) and all(isinstance(v, (int, float)) for v in data.values()):
            scores = {k: float(v) for k, v in data.items()}
    except (KeyError, TypeError, ValueError):
        pass
    if scores is not None and all(math.isfinite(v) for v in scores.values()):
        return scores
    raise UsageError(f"{path}: expected {{task: score}} (finite scores) or a results.json of asymlora eval")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")[:100]


# ---------------------------------------------------------------------------------------------
# asymlora train / compare / generate


def _add_run_config(p: argparse.ArgumentParser) -> None:
    """Flags shared by train and compare: a config file, overrides, and the common shortcuts."""
    p.add_argument("--config", type=Path, help="TOML or YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.lr=1e-4 (repeatable)")  # fmt: skip
    p.add_argument("--model", help="smollm2-135m, tiny-llama, a folder or a hub id")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--suite", choices=list(SUITES), help="train on a named suite")
    what.add_argument("--tasks", help="comma-separated task names or .jsonl files")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--out", type=Path, help="output folder")


def _run_config_overrides(args: argparse.Namespace) -> list[str]:
    """The shortcut flags as ``section.key=value`` overrides (applied before --set)."""
    out = []
    if args.model:
        out.append(f"model={json.dumps(args.model)}")
    if args.suite:
        out += [f"data.suite={json.dumps(args.suite)}", "data.tasks=[]"]
    if args.tasks:
        out.append(f"data.tasks={json.dumps(_names(args.tasks, '--tasks'))}")
    if args.steps is not None:
        out.append(f"train.steps={args.steps}")
    if args.out:
        out.append(f"output_dir={json.dumps(str(args.out))}")
    return out


def _load_multitask_config(args: argparse.Namespace, extra: list[str] | None = None):
    from asymlora.recipes.multitask import load_config

    return load_config(args.config, [*_run_config_overrides(args), *(extra or []), *args.overrides])


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one adapter (lora, alora, hydralora, mola) on several tasks")
    _add_run_config(p)
    p.add_argument("--method", choices=["lora", "alora", "hydralora", "mola"], help="adapter.method")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run in the output folder and start again"
    )


def run_train(args: argparse.Namespace) -> int:
    from asymlora.recipes.multitask import run

    cfg = _load_multitask_config(args, [f"adapter.method={json.dumps(args.method)}"] if args.method else [])
    run(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train and evaluate several methods x seeds under one budget")
    _add_run_config(p)
    p.add_argument("--methods", default="lora,alora,hydralora,mola", help="comma-separated methods")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--single-task-baseline", action="store_true",
                   help="also train single-task LoRA per task and report delta-m %% against it")  # fmt: skip


def run_compare(args: argparse.Namespace) -> int:
    from asymlora.recipes.compare import compare

    cfg = _load_multitask_config(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    methods = _names(args.methods, "--methods")
    out = args.out or Path("runs") / "compare"
    compare(cfg, methods, seeds, out, single_task_baseline=args.single_task_baseline)
    return 0


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt with a trained adapter")
    p.add_argument("--adapter", required=True, type=Path, help="a run folder written by asymlora train")
    p.add_argument("--prompt", required=True)
    p.add_argument("--task", help="task name or index (adapters routed by task)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)


def run_generate(args: argparse.Namespace) -> int:
    from asymlora.recipes.generate import generate

    print(
        generate(
            args.adapter, args.prompt, task=args.task, chat=args.chat, max_new_tokens=args.max_new_tokens
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------
# asymlora federate / export / comm


def add_federate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federate", help="simulate a federation in one process (one base model, N adapter states)"
    )
    p.add_argument("--config", type=Path, help="TOML or YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set federation.rounds=5 (repeatable)")  # fmt: skip
    p.add_argument("--model", help="smollm2-135m, tiny-llama, a folder or a hub id")
    p.add_argument(
        "--method",
        help="federation.method: fedit, ffa, fedsa, fedalora, zeropad, flora, flexlora, fedalora-het",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--suite", choices=list(SUITES), help="one client per task of a suite")
    what.add_argument("--tasks", help="comma-separated task names or .jsonl files (one client each)")
    p.add_argument("--ranks", help="one rank per client, e.g. 64,64,32,32,16,16,8,8")
    p.add_argument("--rounds", type=int, help="federation.rounds")
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run in the output folder and start again"
    )
    p.add_argument(
        "--methods", help="compare: comma-separated methods, one run per method and seed (needs --out)"
    )
    p.add_argument("--seeds", help="compare: comma-separated seeds (default: the config's seed)")


def run_federate(args: argparse.Namespace) -> int:
    from asymlora.recipes.fed_compare import fed_compare
    from asymlora.recipes.federated import load_config, run

    shortcuts = []
    if args.model:
        shortcuts.append(f"model={json.dumps(args.model)}")
    methods = _names(args.methods, "--methods") if args.methods is not None else []
    if args.method and methods:
        raise UsageError("give --method (one run) or --methods (one run per method), not both")
    if args.method or methods:  # with --methods the config is checked against the first of them
        shortcuts.append(f"federation.method={json.dumps(args.method or methods[0])}")
    if args.suite:
        shortcuts += [f"clients.suite={json.dumps(args.suite)}", "clients.tasks=[]"]
    if args.tasks:
        shortcuts.append(f"clients.tasks={json.dumps(_names(args.tasks, '--tasks'))}")
    if args.ranks:
        shortcuts.append(f"adapter.ranks=[{_int_list(args.ranks, '--ranks')}]")
    if args.rounds is not None:
        shortcuts.append(f"federation.rounds={args.rounds}")
    if args.out:
        shortcuts.append(f"output_dir={json.dumps(str(args.out))}")
    cfg = load_config(args.config, [*shortcuts, *args.overrides])
    if args.methods is None and args.seeds is None:
        run(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0
    if args.out is None:
        raise UsageError("--methods/--seeds compare several runs: give --out for their folder")
    methods = methods or [cfg.federation.method]
    seeds = [int(s) for s in _int_list(args.seeds, "--seeds").split(",")] if args.seeds else [cfg.seed]
    fed_compare(cfg, methods, seeds, args.out)  # finished cells are skipped, others resumed
    return 0


def _int_list(text: str, flag: str) -> str:
    try:
        return ",".join(str(int(v)) for v in _names(text, flag))
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _names(text: str, flag: str) -> list[str]:
    """The comma-separated items of a flag, refused when there is none (``--tasks " , "``)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"{flag}: expected comma-separated names, got {text!r}")
    return names


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained adapter as a standard PEFT LoRA folder")
    p.add_argument("run", type=Path, help="a run folder of asymlora federate or asymlora train")
    p.add_argument("out", type=Path, help="the PEFT folder to write")
    p.add_argument("--client", help="federate runs: client index or name")
    p.add_argument("--task", help="train runs routed by task: task name or index")


def run_export(args: argparse.Namespace) -> int:
    from asymlora.adapters import export_peft

    if (args.run / "rounds.jsonl").exists() or (args.run / "clients.json").exists():
        from asymlora.recipes.federated import export_client

        if args.client is None:
            raise UsageError("--client: a federate run holds one model per client; choose one")
        client = int(args.client) if args.client.isdigit() else args.client
        folder = export_client(args.run, client, args.out)
    else:
        from asymlora.recipes.generate import resolve_task
        from asymlora.recipes.multitask import load_run

        model, _, cfg, names = load_run(args.run)
        task = resolve_task(args.task, names, cfg.adapter.router)
        folder = export_peft(model, args.out, task=task)
    print(f"wrote PEFT LoRA folder {folder}")
    return 0


def add_comm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "comm", help="communication per client per round of each federated method, from shapes alone"
    )
    p.add_argument("--model", required=True,
                   help="llama-2-7b, llama-3-8b, qwen2-7b (bundled), a config.json, a model folder or a hub id")  # fmt: skip
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated target module names")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ranks", help="heterogeneous methods: one rank per client, e.g. 64,64,32,32,16,16,8,8")
    p.add_argument("--dm", type=int, default=16, help="fedalora-het: d_m")
    p.add_argument("--methods", default="all", help="comma-separated methods or all")
    p.add_argument(
        "--dtype", default="float32", help="bytes per parameter from this dtype (float32, bf16, ...)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_comm(args: argparse.Namespace) -> int:
    from asymlora.federated.comm import comm_table, format_table, to_json

    ranks = [int(v) for v in _int_list(args.ranks, "--ranks").split(",")] if args.ranks else None
    targets = _names(args.targets, "--targets")
    try:
        table = comm_table(
            args.model, targets, args.rank, ranks=ranks, d_m=args.dm, methods=args.methods, dtype=args.dtype
        )
    except (ValueError, KeyError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    print(to_json(table) if args.json else format_table(table))
    return 0


# ---------------------------------------------------------------------------------------------
# asymlora analyze


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="why share B: subspace similarity, change and gradients of A and B")
    what = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    sim = what.add_parser("similarity", help="principal-angle similarity of two adapters, layer by layer")
    sim.add_argument("run_a", type=Path)
    sim.add_argument("run_b", type=Path)
    sim.add_argument("--i", type=int, help="top-i singular vectors of the first (default r)")
    sim.add_argument("--j", type=int, help="top-j singular vectors of the second (default r)")
    sim.add_argument(
        "--out", type=Path, help="folder for similarity.json and similarity.png (default: run_a)"
    )
    chg = what.add_parser("change", help="magnitude and direction change of A and B during training")
    chg.add_argument("run", type=Path, help="a run folder with adapter_init/ and adapter/")
    chg.add_argument("--out", type=Path, help="folder for change.json and change.png (default: the run)")
    grd = what.add_parser(
        "gradients",
        help="per-layer gradient norms of A and B and task-pair conflicts, with A shared and/or B shared",
    )
    grd.add_argument("--suite", choices=list(SUITES), help="the suite's tasks (all, or those in --tasks)")
    grd.add_argument("--tasks", help="comma-separated task names (of --suite, if given) or .jsonl files")
    grd.add_argument(
        "--share", choices=["a", "b", "both"], default="both",
        help="a: one shared A, one B per task (HydraLoRA-shaped); b: one A per task, shared B (ALoRA-shaped)",
    )  # fmt: skip
    grd.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama, a folder or a hub id")
    grd.add_argument("--steps", type=int, default=20, help="training steps before (and between) measurements")
    grd.add_argument(
        "--measure-every", type=int, default=0, help="also measure every N steps (0: at the end only)"
    )
    grd.add_argument("--examples", type=int, default=8, help="measurement examples per task")
    grd.add_argument("--batch-size", type=int, default=8)
    grd.add_argument("--max-length", type=int, default=128)
    grd.add_argument("--lr", type=float, default=1e-3)
    grd.add_argument("--r", type=int, default=8, help="adapter rank")
    grd.add_argument("--targets", default="q_proj,o_proj", help="comma-separated target module names")
    grd.add_argument("--seed", type=int, default=0, help="adapter initialisation and batch order")
    grd.add_argument(
        "--out", type=Path, help="folder for gradients.json and gradients.png (default runs/analyze/...)"
    )


def run_analyze(args: argparse.Namespace) -> int:
    from asymlora import analysis

    if args.analysis == "gradients":
        return run_analyze_gradients(args)
    if args.analysis == "similarity":
        result = analysis.similarity(args.run_a, args.run_b, i=args.i, j=args.j)
        out, plot = args.out or args.run_a, analysis.plot_similarity
    else:
        if not (args.run / "adapter_init").is_dir():
            raise UsageError(f"{args.run}: no adapter_init/ (runs of asymlora train save it at the start)")
        result = analysis.change(args.run / "adapter_init", args.run / "adapter")
        out, plot = args.out or args.run, analysis.plot_change
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.analysis}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{args.analysis}.png")
    print(f"wrote {out / (args.analysis + '.json')} and {out / (args.analysis + '.png')}")
    return 0


def _gradient_tasks(args: argparse.Namespace) -> list[Task]:
    if not args.suite and not args.tasks:
        raise UsageError("give --suite, --tasks, or both")
    suite = get_suite(args.suite) if args.suite else None
    if args.tasks:
        names = _names(args.tasks, "--tasks")
        if suite is not None:
            known = {t.name for t in suite}
            outside = [n for n in names if n not in known]
            if outside:
                raise UsageError(
                    f"--tasks: {', '.join(outside)} not in suite {args.suite} ({', '.join(sorted(known))})"
                )
        tasks = get_tasks(names)
    else:
        tasks = suite
    if len({t.name for t in tasks}) < 2:
        raise UsageError(
            f"gradient conflicts need at least 2 different tasks, got {len({t.name for t in tasks})}"
        )
    return tasks


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def run_analyze_gradients(args: argparse.Namespace) -> int:
    from asymlora.analysis import plot_gradients
    from asymlora.analysis.sharing import GradientExperiment, run_gradient_experiment

    tasks = _gradient_tasks(args)
    targets = _names(args.targets, "--targets")
    try:
        exp = GradientExperiment(
            model=args.model, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
            lr=args.lr, seed=args.seed, r=args.r, target_modules=targets, examples=args.examples,
            measure_every=args.measure_every,
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(str(err)) from None
    for task in tasks:  # fetch / validate every task's data before loading the model
        task.examples()
    shares = ["a", "b"] if args.share == "both" else [args.share]
    out = args.out or Path("runs") / "analyze" / _slug(
        f"gradients-{args.model}-{'+'.join(t.name for t in tasks)}"
    )
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for share in shares:
        results[share] = run_gradient_experiment(tasks, share, exp, out / f"train_{share}", log=print)
    report = {
        "analysis": "gradients",
        "model": args.model,
        "tasks": [t.name for t in tasks],
        "settings": dataclasses.asdict(exp),
        "results": results,
    }
    (out / "gradients.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_gradients(list(results.values()), out / "gradients.png")
    print(f"gradients on {len(tasks)} tasks ({', '.join(report['tasks'])}), steps {exp.measure_steps()}:")
    for res in results.values():
        shared = res["shared_matrix"]
        print(
            f"  shared {shared} ({res['method']}): mean grad norm of the shared {shared} "
            f"{_num(res['mean_grad_norm_shared'])} (A {_num(res['mean_grad_norm_A'])}, B {_num(res['mean_grad_norm_B'])}); "
            f"conflicts {res['total_conflicts']}/{res['total_pairs']} task pairs x modules"
        )
    print(f"wrote {out / 'gradients.json'} and {out / 'gradients.png'}")
    return 0


# ---------------------------------------------------------------------------------------------

COMMANDS: dict[
    str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]
] = {
    "tasks": (add_tasks, run_tasks),
    "eval": (add_eval, run_eval),
    "train": (add_train, run_train),
    "compare": (add_compare, run_compare),
    "generate": (add_generate, run_generate),
    "federate": (add_federate, run_federate),
    "export": (add_export, run_export),
    "comm": (add_comm, run_comm),
    "analyze": (add_analyze, run_analyze),
}

DEBUG_ENV = "ASYMLORA_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asymlora", description=__doc__.splitlines()[0])
    debug_help = f"show the traceback of an error (as {DEBUG_ENV}=1 does)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    for command in sub.choices.values():
        command.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
        # --debug also after the command: asymlora train --debug ...
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def check_finite_flags(args: argparse.Namespace) -> None:
    """Refuse inf and nan in every number flag (argparse's float() accepts them)."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')}={value}: give a finite number")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. An error the user can fix (``asymlora.errors.user_error``) is printed as
    one line, exit status 2; with --debug or ASYMLORA_DEBUG=1 it keeps its traceback, as every
    other (unexpected) exception does."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        check_finite_flags(args)
        if args.threads is not None and args.threads < 0:
            raise UsageError(f"--threads must be >= 0 (0: one per core), got {args.threads}")
        choose_threads(args.threads)
        return COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"asymlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        known = user_error(err)
        if known is None or debug:
            raise
        print(f"asymlora {args.command}: error: {one_line(*known)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
