"""The ``asymlora`` command: a thin shell over the library.

Each subcommand is two small functions: ``add_<name>(subparsers)`` declares its flags and
``run_<name>(args)`` does the work; ``COMMANDS`` lists them, so a new subcommand is one more pair
and one more line.

Only light modules are imported here: torch, transformers and datasets are imported by the
``run_<name>`` functions that need them, so that ``asymlora --help`` and ``asymlora tasks`` start
in well under two seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

from asymlora.checkpoint_signal import checkpoint_requests_noted
from asymlora.config import Override, first_repeated
from asymlora.data.bigbench import BigBenchUnavailableError
from asymlora.data.registry import (
    SUITES,
    get_suite,
    get_task,
    get_tasks,
    is_downloaded,
    is_generated,
    split_counts,
)
from asymlora.data.task import Task
from asymlora.errors import AsymloraError, UsageError, one_line, user_error
from asymlora.models import DEVICES, DTYPE_CHOICES
from asymlora.threads import check_threads, choose_threads, use_threads

# The federated methods (asymlora.federated.registry.METHODS, which imports torch), named here so
# that building the parser imports nothing heavy; tests/test_cli_help.py keeps the two equal.
FEDERATED_METHODS = ("fedit", "ffa", "fedsa", "fedalora", "zeropad", "flora", "flexlora", "fedalora-het")

DESCRIPTION = """\
Fine-tune language models with several LoRA adapters at once: ALoRA (several A
matrices, one shared B), Fed-ALoRA (federated clients share only B) and the
methods they are compared with. Run 'asymlora COMMAND --help' for a command's
flags and examples."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the examples and shows every flag's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != []
        shown = shown and action.default != argparse.SUPPRESS
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _command(
    sub: argparse._SubParsersAction, name: str, help: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter)


# ---------------------------------------------------------------------------------------------
# asymlora tasks


def add_tasks(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "tasks", "list the task suites with their example counts", [
        "asymlora tasks --offline            # counts of what is on this machine, nothing downloaded",
        "asymlora tasks --suite commonsense  # one suite (downloads its BIG-bench files once)",
        "asymlora tasks --rg                 # every reasoning-gym dataset usable as rg:<dataset>",
    ])  # fmt: skip
    p.add_argument("--suite", choices=list(SUITES), help="only this suite")
    p.add_argument("--rg", action="store_true",
                   help="list the reasoning-gym datasets (tasks rg:<dataset>?<setting>=...) with their settings")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="split seed (grouped tasks' counts depend on it)")
    p.add_argument(
        "--offline", action="store_true", help="do not download or generate missing data; mark it instead"
    )
    _add_json(p, "the suites and their tasks ({suite: [{task, kind, train, test, source, status}]}, "
                 "unavailable: [why])")  # fmt: skip


def run_tasks(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: give a split seed >= 0")
    if args.rg:
        return _list_rg(args.json)
    suites = [args.suite] if args.suite else list(SUITES)
    show = (lambda line: None) if args.json else print
    reasons: list[str] = []  # why tasks are unavailable, each once: the lines refer to them by number
    listing: dict[str, list[dict]] = {}
    for suite in suites:
        tasks = get_suite(suite)
        show(f"{suite} ({len(tasks)} tasks)")
        show(f"  {'task':44} {'kind':16} {'train':>6} {'test':>6}  source")
        listing[suite] = []
        for task in tasks:
            listing[suite].append(_task_row(task, seed=args.seed, offline=args.offline, reasons=reasons))
            show("  " + _task_line(listing[suite][-1]))
        show("")
    show("any reasoning-gym dataset: rg:<dataset>?size=N&seed=N&<its setting>=<value> (asymlora tasks --rg)")
    if args.json:
        print(json.dumps({"suites": listing, "unavailable": reasons}, indent=2))
    for number, reason in enumerate(reasons, 1):
        print(f"asymlora tasks: unavailable ({number}): {reason}", file=sys.stderr)
    return 1 if reasons else 0


def _list_rg(as_json: bool) -> int:
    """Every reasoning-gym dataset with its own settings and their defaults."""
    from asymlora.data.rg import dataset_names, dataset_settings

    listing = {name: dataset_settings(name) for name in dataset_names()}
    if as_json:
        print(json.dumps(listing, indent=2, default=repr))
        return 0
    print(f"{len(listing)} reasoning-gym datasets, each a task rg:<dataset>?size=1000&seed=0&<setting>=<v>")
    print("(multiple choice where its answers are a small closed set, else generated and scored by its "
          "score_answer; see the README)")  # fmt: skip
    for name, settings in listing.items():
        print(f"  {name:32} " + " ".join(f"{k}={v!r}" for k, v in settings.items()))
    return 0


def _task_row(task: Task, *, seed: int, offline: bool, reasons: list[str]) -> dict:
    """A task's counts, or why there are none: ``status`` is "counted", "not downloaded",
    "generated on first use" or "unavailable (N)", N numbering ``reasons``."""
    row = {"task": task.name, "kind": task.kind, "train": None, "test": None, "source": task.source}
    if offline and not is_downloaded(task):
        return row | {"status": "not downloaded"}
    try:
        sizes = split_counts(task, seed, compute=not (offline and is_generated(task)))
    except (BigBenchUnavailableError, ImportError) as err:
        if str(err) not in reasons:
            reasons.append(str(err))
        return row | {"status": f"unavailable ({reasons.index(str(err)) + 1})"}
    if sizes is None:
        return row | {"status": "generated on first use"}
    return row | {"train": sizes["train"], "test": sizes["test"], "status": "counted"}


def _task_line(row: dict) -> str:
    head = f"{row['task']:44} {row['kind']:16}"
    if row["status"] == "counted":
        return f"{head} {row['train']:6d} {row['test']:6d}  {row['source']}"
    if row["status"].startswith("unavailable"):
        return f"{head} {'-':>6} {'-':>6}  {row['status'][:-1]}, below)"
    return f"{head} {'-':>6} {'-':>6}  {row['source']} ({row['status']})"


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print JSON on stdout and nothing else there (what is said on the way goes to stderr): {what}")  # fmt: skip


@contextmanager
def _stdout_to_stderr(on: bool) -> Iterator[None]:
    """With --json: whatever the command says goes to stderr, so that stdout holds only the JSON
    printed after the block."""
    with redirect_stdout(sys.stderr) if on else nullcontext():
        yield


def _print_json(data: object) -> None:
    """Standard JSON (a non-finite number as null) on stdout."""
    from asymlora.runfolder import finite

    print(json.dumps(finite(data), indent=2, allow_nan=False))


# ---------------------------------------------------------------------------------------------
# asymlora eval


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "eval", "evaluate a model or an adapter on a suite or on tasks; prints a table, writes JSON", [
        "asymlora eval --model smollm2-135m --suite commonsense --limit 200",
        "asymlora eval --model tiny-llama --task mine.jsonl --split all",
        "asymlora eval --adapter runs/my-run --suite commonsense       # a run folder: routed by task name",
        "asymlora eval --adapter runs/my-run/peft/social_iqa --task social_iqa   # a PEFT LoRA folder",
        "asymlora eval --model smollm2-135m --task bigbench:logical_deduction --task 'hf:./my_qa?prompt=q&target=a'",
    ])  # fmt: skip
    p.add_argument("--model", help="the base model: smollm2-135m, tiny-llama, tiny-gpt2, a folder or a hub id "
                   "(with --adapter: default, the base the adapter records)")  # fmt: skip
    p.add_argument("--adapter", type=Path, help="evaluate with this adapter: a PEFT LoRA folder, an asymlora "
                   "adapter folder or a run folder of asymlora train")  # fmt: skip
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--suite", choices=list(SUITES), help="a named suite")
    what.add_argument("--task", action="append", help="a task name, bigbench:<task>, rg:<dataset>, "
                      "hf:<dataset>?<columns>, or a .json/.jsonl file (repeatable); with a task-routed adapter also its route")  # fmt: skip
    p.add_argument("--route", help="task-routed adapters: the adapter task (name or index) for every question "
                   "(default: the task of the same name, as the run that trained the adapter names them)")  # fmt: skip
    p.add_argument("--split", choices=["test", "all"], default="test",
                   help="score each task's test split (20%% of its examples, held out from training) or all of them")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--batch-size", type=int, default=8, help="questions (or choices) per forward pass")
    p.add_argument("--max-length", type=int, default=1024, help="prompt tokens kept (from the right)")
    _add_placement(p, "a run folder's own settings, else auto")
    p.add_argument(
        "--references", type=Path, help="JSON {task: score} or an earlier results.json, for delta-m"
    )
    p.add_argument(
        "--out",
        type=out_path,
        help="output folder (default runs/eval/<model>-<suite>, or -2, -3, ... where that holds a result): "
        "results.json, results.md, tasks.jsonl",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the earlier evaluation that --out holds")
    _add_json(p, "results.json's content without the per-question predictions, and where it was written")


def _add_placement(p: argparse.ArgumentParser, default: str) -> None:
    """--device and --dtype of the base model, as train's ``device`` and ``dtype`` settings."""
    p.add_argument("--device", choices=list(DEVICES),
                   help=f"where the model runs: auto (cuda when available) | cpu | cuda (default: {default})")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES),
                   help=f"the base weights' dtype; auto: as transformers loads them (default: {default})")  # fmt: skip


def run_eval(args: argparse.Namespace) -> int:
    with _stdout_to_stderr(args.json):
        report, written = _evaluate(args)
    if args.json:
        _print_json(report.to_dict(predictions=False) | {"results_json": str(written)})
    return 0


def _evaluate(args: argparse.Namespace):
    from asymlora.eval.runner import check_eval_options
    from asymlora.models import resolve_device
    from asymlora.recipes.evaluate import check_eval_out, default_eval_out

    check_eval_options(args.limit, args.batch_size, args.max_length)
    if args.device:  # cuda without a GPU is refused before any data is fetched
        resolve_device(args.device, "--device")
    if args.model is None and args.adapter is None:
        raise UsageError("give --model (a base model) or --adapter (an adapter folder or a run folder)")
    name = args.model or args.adapter.name
    out = args.out or default_eval_out(_slug(f"{name}-{args.suite or '+'.join(args.task)}"))
    check_eval_out(out, overwrite=args.overwrite)
    return _evaluate_into(args, out)


def _evaluate_into(args: argparse.Namespace, out: Path):
    from asymlora.models import placement
    from asymlora.recipes.evaluate import check_eval_out, describe_split, load_for_eval, route_tasks
    from asymlora.runfolder import folder_lock

    tasks = get_suite(args.suite) if args.suite else get_tasks(args.task)
    references = read_references(args.references) if args.references else None
    for task in tasks:  # fetch, validate and split every task's data before loading the model
        task.splits(args.seed)
    use_threads(log=lambda line: print(line, file=sys.stderr))
    loaded = load_for_eval(args.model, args.adapter, device=args.device, dtype=args.dtype)
    task_ids = route_tasks(loaded, tasks, args.route)
    print(f"model: {loaded.description} on {placement(loaded.model)}", file=sys.stderr)
    print(describe_split(args.split, args.seed, args.limit), file=sys.stderr)
    with folder_lock(out, wait=False):  # after every check; two evaluations never share a folder
        check_eval_out(out, overwrite=args.overwrite)  # again, now that no other process may write it
        return _write_evaluation(args, out, loaded, tasks, task_ids, references)


def _write_evaluation(args: argparse.Namespace, out: Path, loaded, tasks, task_ids, references):
    from asymlora.eval.runner import evaluate_tasks, majority_report
    from asymlora.models import placement

    out.mkdir(parents=True, exist_ok=True)
    per_task = out / "tasks.jsonl"
    per_task.write_text("", encoding="utf-8")

    def progress(result) -> None:  # each task is kept as soon as it is scored
        route = f", routed to adapter task {task_ids[result.task]}" if task_ids else ""
        print(f"  {result.task}: {result.metric} {result.score:.2f} on {result.n} questions "
              f"of the {args.split} split{route}", file=sys.stderr)  # fmt: skip
        with per_task.open("a", encoding="utf-8") as f:
            f.write(json.dumps(dataclasses.asdict(result)) + "\n")

    report = evaluate_tasks(
        loaded.model, loaded.tokenizer, tasks, task_ids=task_ids, references=references, progress=progress,
        limit=args.limit, seed=args.seed, split=args.split, batch_size=args.batch_size, max_length=args.max_length,
    )  # fmt: skip
    report.majority = majority_report(tasks, seed=args.seed, limit=args.limit, split=args.split)
    report.info = {"model": args.model, "adapter": str(args.adapter) if args.adapter else None,
                   "base_model": loaded.base, "suite": args.suite, "tasks_requested": args.task,
                   "split": args.split, "limit": args.limit, "seed": args.seed, "routes": task_ids,
                   "placement": placement(loaded.model)}  # fmt: skip
    report.save(out / "results.json")
    (out / "results.md").write_text(report.to_markdown() + "\n", encoding="utf-8")
    print(report.to_markdown())
    print(
        f"\nscored {sum(r.n for r in report.results)} questions ({args.split} split) of {len(tasks)} task(s)"
    )
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return report, out / "results.json"


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


def out_path(text: str) -> Path:
    """An output path from the command line: an empty one (which would write into the current
    folder) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give a folder or file, not an empty string")
    return Path(text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_")[:100]


# ---------------------------------------------------------------------------------------------
# asymlora train / compare / generate


def _add_run_config(p: argparse.ArgumentParser, out_default: str = "the config's output_dir") -> None:
    """Flags shared by train and compare: a config file, overrides, and the common shortcuts."""
    p.add_argument("--config", type=Path, help="TOML or YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set train.lr=1e-4 (repeatable)")  # fmt: skip
    p.add_argument(
        "--model", help="model (default smollm2-135m): smollm2-135m, tiny-llama, a folder or a hub id"
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--suite", choices=list(SUITES), help="train on a named suite (default commonsense)")
    what.add_argument(
        "--tasks", help="comma-separated task names, bigbench:<task>, hf:<dataset>?... or .jsonl files"
    )
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps, default 100)")
    p.add_argument("--out", type=out_path, help=f"output folder (default: {out_default})")


def _shortcuts(args: argparse.Namespace, data: str) -> list[Override]:
    """The shortcut flags every run command has, as typed ``(path, value)`` overrides (applied
    before --set); ``data`` is the config section that holds the tasks."""
    out: list[Override] = []
    if args.model:
        out.append((("model",), args.model))
    if args.suite:
        out += [((data, "suite"), args.suite), ((data, "tasks"), [])]
    if args.tasks:
        out.append(((data, "tasks"), _names(args.tasks, "--tasks")))
    if args.out:
        out.append((("output_dir",), str(args.out)))
    return out


def _load_multitask_config(args: argparse.Namespace, extra: Sequence[Override] = ()):
    from asymlora.recipes.multitask import load_config

    steps = [(("train", "steps"), args.steps)] if args.steps is not None else []
    return load_config(args.config, [*_shortcuts(args, "data"), *steps, *extra, *args.overrides])


def add_train(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "train", "train one adapter (lora, alora, hydralora, mola) on several tasks", [
        "asymlora train --config configs/demo.yaml --method alora --out runs/my-run",
        "asymlora train --model tiny-llama --tasks a.jsonl,b.jsonl --steps 20 --set adapter.router=task",
        "asymlora train --config configs/demo.yaml --set adapter.balance_loss=0.01   # balance the softmax "
        "router's experts (docs/router.md)",
        "asymlora train --config runs/my-run/config.yaml --resume    # continue after a stop",
    ])  # fmt: skip
    _add_run_config(p)
    p.add_argument("--method", choices=["lora", "alora", "hydralora", "mola", "peft:lily", "peft:poly"],
                   help="adapter.method (peft:lily, peft:poly: PEFT's own methods, docs/peft-anchors.md)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run in the output folder and start again"
    )
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the trainable parameter count and a memory estimate of one "
                        "training step, then exit, writing nothing. The estimate is arithmetic from the model's "
                        "shapes (no weights are loaded; a Llama-shaped block): the base weights; the adapters' weights, gradients and "
                        "AdamW's two moments; the activations one micro-batch keeps for the backward pass, at most: "
                        "every example at train.max_length tokens, the loss's float32 logits at every token. Not counted: "
                        "the CUDA context, the allocator's slack, the batch and evaluation")  # fmt: skip
    _add_json(p, "the end-of-run summary (results.json's content without the per-question predictions), "
                 "or with --dry-run its config, counts and estimate in bytes")  # fmt: skip


def run_train(args: argparse.Namespace) -> int:
    from asymlora.recipes.dryrun import describe, dry_run
    from asymlora.recipes.multitask import run

    cfg = _load_multitask_config(args, [(("adapter", "method"), args.method)] if args.method else [])
    with _stdout_to_stderr(args.json):
        summary = (dry_run if args.dry_run else run)(cfg, resume=args.resume, overwrite=args.overwrite)
    if args.json and summary:  # under torchrun, rank 0's
        _print_json(summary | {"output_dir": cfg.output_dir})
    elif args.dry_run:
        print(describe(summary))
    return 0


def add_compare(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "compare", "train and evaluate several methods x seeds under one budget", [
        "asymlora compare --config configs/demo.yaml --methods lora,alora --seeds 0 --out runs/demo",
        "asymlora compare --config configs/commonsense-smollm2.yaml --single-task-baseline --out runs/cs",
        "asymlora compare --config configs/reasoning-smollm2.yaml --methods lora,alora,peft:lily,peft:poly --out runs/anchors",
    ])  # fmt: skip
    _add_run_config(p, out_default="<the config's output_dir>/compare")
    p.add_argument("--methods", default="lora,alora,hydralora,mola",
                   help="comma-separated methods: lora, alora, hydralora, mola, factored; m@other (m at the smallest "
                        "rank with at least other's trainable parameters, e.g. lora@alora); peft:lily, peft:poly "
                        "(PEFT's own Lily and Poly, built and run by PEFT on the same targets, data, budget and "
                        "evaluation; Lily: stride_A=3 (one A per 3 blocks), num_B=max(2, ceil(blocks/3)), "
                        "scaling=1.0; Poly: n_skills=adapter.num_experts, n_splits=1, n_tasks=the tasks, routed "
                        "by task id; each at the smallest r with at least alora's trainable parameters; "
                        "peft:xlora is refused: docs/peft-anchors.md)")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--single-task-baseline", nargs="?", const="same", metavar="same|share",
                   help="also train one LoRA per task and report delta-m %% against it: for train.steps "
                        "(same, the default) or for the task's share of the mix's steps (share)")  # fmt: skip
    p.add_argument("--against", help="comma-separated methods every other is paired against "
                                     "(default lora; the first is the headline's)")  # fmt: skip
    _add_grid_flags(p)


def _add_grid_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", action="store_true",
                   help="only say where each cell stands (finished, running, resumable from step or round "
                        "N, not started) and its CPU time; runs nothing")  # fmt: skip
    p.add_argument("--leave-busy", action="store_true",
                   help="leave cells another process is running to it instead of waiting for them (the "
                        "table is then made by the call that finds every cell finished): for several "
                        "workers on one grid")  # fmt: skip


def run_compare(args: argparse.Namespace) -> int:
    from asymlora.recipes.compare import compare
    from asymlora.runfolder import check_out

    cfg = _load_multitask_config(args)
    seeds = _seeds(args.seeds)
    methods = _names(args.methods, "--methods")
    out = args.out or Path(cfg.output_dir) / "compare"  # beside, not over, what train writes there
    check_out(out, "grid", "asymlora compare")
    against = _names(args.against, "--against") if args.against else None
    compare(
        cfg,
        methods,
        seeds,
        out,
        args.single_task_baseline,
        against,
        wait=not args.leave_busy,
        status=args.status,
    )
    return 0


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "generate", "answer prompts with a base model and an adapter", [
        "asymlora generate --adapter runs/my-run --prompt 'Q: What is 2+2?\\nA:'",
        "asymlora generate --adapter runs/my-run --task social_iqa --chat --prompt 'Why do people queue?'",
        "asymlora generate --adapter PEFT_FOLDER --model smollm2-135m --prompts in.jsonl --out out.jsonl",
        "asymlora generate --model smollm2-135m --do-sample --temperature 0.7 --top-p 0.9 --seed 1 --prompt 'Hi'",
    ])  # fmt: skip
    p.add_argument("--adapter", type=Path,
                   help="a run folder of asymlora train, an asymlora adapter folder or a PEFT LoRA folder")  # fmt: skip
    p.add_argument("--model", help="the base model (default: the one the adapter records)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue (or, with --chat, the user message)")
    what.add_argument(
        "--prompts", type=Path, help='a JSONL file of {"prompt": ...} objects, answered in batches'
    )
    p.add_argument("--out", type=out_path, help='with --prompts: the JSONL file to write, each input object with '
                   'its "output" (default: stdout)')  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated at once (left-padded)")
    p.add_argument("--task", help="task name or index (adapters routed by task)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated at most")
    p.add_argument("--do-sample", action="store_true", help="sample tokens instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="with --do-sample: the softmax temperature (> 0)")
    p.add_argument(
        "--top-p", type=float, help="with --do-sample: nucleus sampling's probability mass, (0, 1]"
    )
    p.add_argument("--seed", type=int, help="with --do-sample: torch's seed, for a repeatable sample")
    _add_placement(p, "the run's own settings")


def run_generate(args: argparse.Namespace) -> int:
    from asymlora.recipes.generate import Sampling, answer_file, generate

    if args.out is not None and args.prompts is None:
        raise UsageError("--out writes the answers to --prompts; with --prompt the answer is printed")
    sampling = Sampling(args.do_sample, args.temperature, args.top_p, args.seed)
    options = dict(task=args.task, chat=args.chat, max_new_tokens=args.max_new_tokens, device=args.device,
                   dtype=args.dtype, model=args.model, sampling=sampling, batch_size=args.batch_size)  # fmt: skip
    if args.prompts is not None:
        written = answer_file(args.adapter, args.prompts, args.out, **options)
        print(written, end="")
        return 0
    print(generate(args.adapter, [args.prompt], **options)[0])
    return 0


# ---------------------------------------------------------------------------------------------
# asymlora federate / export / comm


def add_federate(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "federate", "simulate a federation in one process (one base model, N adapter states)", [
        "asymlora federate --method fedalora --suite fed-nlp --rounds 3 --out runs/fed",
        "asymlora federate --method fedalora-het --suite fed-nlp --ranks 64,64,32,32,16,16,8,8",
        "asymlora federate --config configs/fed-nlp-smollm2.yaml --methods fedit,fedalora --seeds 0,1,2 --out runs/fed",
    ])  # fmt: skip
    p.add_argument("--config", type=Path, help="TOML or YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set federation.rounds=5 (repeatable)")  # fmt: skip
    p.add_argument(
        "--model", help="model (default smollm2-135m): smollm2-135m, tiny-llama, a folder or a hub id"
    )
    p.add_argument("--method", choices=list(FEDERATED_METHODS), help="federation.method (one run)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--suite", choices=list(SUITES), help="one client per task of a suite")
    what.add_argument("--tasks", help="comma-separated task names or .jsonl files (one client each)")
    p.add_argument("--ranks", help="one rank per client, e.g. 64,64,32,32,16,16,8,8")
    p.add_argument("--rounds", type=int, help="federation.rounds")
    p.add_argument("--out", type=out_path, help="output folder (default: the config's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run in the output folder and start again"
    )
    p.add_argument(
        "--methods", help="compare: comma-separated methods, one run per method and seed (needs --out)"
    )
    p.add_argument("--seeds", help="compare: comma-separated seeds (default: the config's seed)")
    p.add_argument("--against", help="compare: comma-separated methods every other is paired against "
                                     "(default fedit; the first is the headline's)")  # fmt: skip
    _add_grid_flags(p)


def run_federate(args: argparse.Namespace) -> int:
    from asymlora.recipes.fed_compare import fed_compare
    from asymlora.recipes.federated import load_config, run

    shortcuts = _shortcuts(args, "clients")
    methods = _names(args.methods, "--methods") if args.methods is not None else []
    if args.method and methods:
        raise UsageError("give --method (one run) or --methods (one run per method), not both")
    if args.method or methods:  # with --methods the config is checked against the first of them
        shortcuts.append((("federation", "method"), args.method or methods[0]))
    if args.ranks:
        shortcuts.append((("adapter", "ranks"), _ints(args.ranks, "--ranks")))
    if args.rounds is not None:
        shortcuts.append((("federation", "rounds"), args.rounds))
    cfg = load_config(args.config, [*shortcuts, *args.overrides])
    if args.methods is None and args.seeds is None:
        if args.against or args.leave_busy or args.status:
            flag = "--against" if args.against else "--leave-busy" if args.leave_busy else "--status"
            raise UsageError(f"{flag} is for a comparison (several runs): give --methods too")
        run(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0
    if args.out is None:
        raise UsageError("--methods/--seeds compare several runs: give --out for their folder")
    from asymlora.runfolder import check_out

    check_out(args.out, "grid", "asymlora federate --methods")
    methods = methods or [cfg.federation.method]
    seeds = _seeds(args.seeds) if args.seeds else [cfg.seed]
    against = _names(args.against, "--against") if args.against else None
    fed_compare(cfg, methods, seeds, args.out, against, wait=not args.leave_busy, status=args.status)
    return 0


def _ints(text: str, flag: str) -> list[int]:
    """The comma-separated integers of a flag (``--ranks 8,4``), refused when there is none."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}")
    return values


MAX_SEED = 2**32 - 1  # numpy's generators take seeds in [0, 2**32)


def _seeds(text: str) -> list[int]:
    """``--seeds``: distinct integers in [0, 2**32), checked before any cell runs (a seed given
    twice would count one run as two in the tables)."""
    seeds = _ints(text, "--seeds")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UsageError(f"--seeds: {bad[0]} is out of range; give seeds from 0 to {MAX_SEED}")
    twice = first_repeated(seeds)
    if twice is not None:
        raise UsageError(f"--seeds: {twice} is given twice; give each seed once")
    return seeds


def _names(text: str, flag: str) -> list[str]:
    """The comma-separated items of a flag, refused when there is none (``--tasks " , "``)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"{flag}: expected comma-separated names, got {text!r}")
    return names


def add_export(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "export", "write a trained adapter as a standard PEFT LoRA folder (with a model card)", [
        "asymlora export runs/my-run runs/my-run-peft --task social_iqa   # router=task: one task",
        "asymlora export runs/fed runs/client3-peft --client 3              # a federate run's client",
    ])  # fmt: skip
    p.add_argument("run", type=Path, help="a run folder of asymlora federate or asymlora train")
    p.add_argument("out", type=out_path, help="the PEFT folder to write")
    p.add_argument("--client", help="federate runs: client index or name")
    p.add_argument("--task", help="train runs routed by task: task name or index")
    p.add_argument("--license", help="the model card's license field, an identifier such as apache-2.0 or mit "
                   "(default: the base model's license where asymlora knows it, else other)")  # fmt: skip


def run_export(args: argparse.Namespace) -> int:
    from asymlora.adapters import export_peft
    from asymlora.adapters.io import check_export_folder
    from asymlora.runfolder import is_federation

    if args.license is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", args.license):
        raise UsageError(
            f"--license {args.license!r}: give a license identifier such as apache-2.0, mit or other"
        )
    check_export_folder(args.out)
    federated = is_federation(args.run)
    if federated and args.task is not None:
        raise UsageError(
            f"--task: {args.run} is a federate run (one model per client); give --client instead"
        )
    if not federated and args.client is not None:
        raise UsageError(f"--client: {args.run} is not a federate run (no rounds.jsonl); leave --client out")
    if federated:
        from asymlora.recipes.federated import export_client

        if args.client is None:
            raise UsageError("--client: a federate run holds one model per client; choose one")
        client = int(args.client) if args.client.isdigit() else args.client
        folder = export_client(args.run, client, args.out, license=args.license)
    else:
        from asymlora.adapters.io import peft_export_problem
        from asymlora.recipes.generate import resolve_task
        from asymlora.recipes.multitask import card_context, load_config, load_run, run_scores

        if (args.run / "config.yaml").is_file():
            problem = peft_export_problem(load_config(args.run / "config.yaml").adapter)
            if problem:
                raise UsageError(f"{args.run}: {problem}")
        model, _, cfg, names = load_run(args.run)
        task = resolve_task(args.task, names, cfg.adapter.router)
        name = "all tasks" if task is None else names[task]
        scores = [s for s in run_scores(args.run) if task is None or s["task"] == name]
        card = {"task": name, "scores": scores, "license": args.license, **card_context(cfg, names)}
        folder = export_peft(model, args.out, task=task, card=card)
    print(f"wrote PEFT LoRA folder {folder} (model card: {folder / 'README.md'})")
    return 0


def add_comm(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "comm", "communication per client per round of each federated method, from shapes alone", [
        "asymlora comm --model llama-2-7b --targets q_proj,v_proj --rank 8 --methods all",
        "asymlora comm --model llama-2-7b --ranks 64,64,32,32,16,16,8,8 --methods zeropad,flora,fedalora-het --json",
    ])  # fmt: skip
    p.add_argument("--model", required=True,
                   help="llama-2-7b, llama-3-8b, qwen2-7b (bundled), a config.json, a model folder or a hub id")  # fmt: skip
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated target module names")
    p.add_argument("--rank", type=int, default=8, help="homogeneous methods: every client's rank")
    p.add_argument("--ranks", help="heterogeneous methods: one rank per client, e.g. 64,64,32,32,16,16,8,8")
    p.add_argument("--dm", type=int, default=16, help="fedalora-het: d_m")
    p.add_argument("--methods", default="all", help="comma-separated methods or all")
    p.add_argument(
        "--dtype", default="float32", help="bytes per parameter from this dtype (float32, bf16, ...)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_comm(args: argparse.Namespace) -> int:
    from asymlora.federated.comm import comm_table, format_table, to_json

    ranks = _ints(args.ranks, "--ranks") if args.ranks else None
    targets = _names(args.targets, "--targets")
    try:
        table = comm_table(
            args.model, targets, args.rank, ranks=ranks, d_m=args.dm, methods=args.methods, dtype=args.dtype
        )
    except AsymloraError:
        raise
    except (ValueError, KeyError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    print(to_json(table) if args.json else format_table(table))
    return 0


# ---------------------------------------------------------------------------------------------
# asymlora analyze


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "analyze", "why share B: subspace similarity, change and gradients of A and B; "
                 "how a run's routers use their experts", [
        "asymlora analyze similarity runs/seed0/adapter runs/seed1/adapter",
        "asymlora analyze change runs/my-run",
        "asymlora analyze gradients --suite commonsense --tasks social_iqa,strategyqa --share both",
        "asymlora analyze router runs/my-run",
    ])  # fmt: skip
    what = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS", help="one of:")

    def analysis(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return what.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                               formatter_class=HelpFormatter)  # fmt: skip

    sim = analysis("similarity", "principal-angle similarity of two adapters, layer by layer",
                   "asymlora analyze similarity runs/seed0/adapter runs/seed1/adapter --i 4 --j 4")  # fmt: skip
    sim.add_argument("run_a", type=Path, help="the first adapter: an adapter folder or a run folder")
    sim.add_argument("run_b", type=Path, help="the second adapter: an adapter folder or a run folder")
    sim.add_argument("--i", type=int, help="top-i singular vectors of the first (default r)")
    sim.add_argument("--j", type=int, help="top-j singular vectors of the second (default r)")
    sim.add_argument(
        "--out", type=out_path, help="folder for similarity.json and similarity.png (default: run_a)"
    )
    chg = analysis("change", "magnitude and direction change of A and B during training",
                   "asymlora analyze change runs/my-run --out runs/my-run/analysis")  # fmt: skip
    chg.add_argument("run", type=Path, help="a run folder with adapter_init/ and adapter/")
    chg.add_argument("--out", type=out_path, help="folder for change.json and change.png (default: the run)")
    rtr = analysis("router", "per-module expert usage and gate entropy of a run's learned routers on its "
                   "training and test prompts, and whether the router has collapsed",
                   "asymlora analyze router runs/my-run --limit 100")  # fmt: skip
    rtr.add_argument("run", type=Path, help="a run folder of asymlora train (softmax or topk router)")
    rtr.add_argument("--limit", type=int, default=64, help="prompts per task and split (train, test)")
    rtr.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    rtr.add_argument("--max-length", type=int, default=1024, help="prompt tokens kept (from the right)")
    rtr.add_argument("--out", type=out_path, help="folder for router.json (default: the run)")
    grd = analysis("gradients",
                   "per-layer gradient norms of A and B and task-pair conflicts, with A shared and/or B shared",
                   "asymlora analyze gradients --suite commonsense --tasks social_iqa,strategyqa --model smollm2-135m")  # fmt: skip
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
    grd.add_argument("--batch-size", type=int, default=8, help="training examples per step")
    grd.add_argument("--max-length", type=int, default=128, help="tokens per example")
    grd.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    grd.add_argument("--r", type=int, default=8, help="adapter rank")
    grd.add_argument("--targets", default="q_proj,o_proj", help="comma-separated target module names")
    grd.add_argument("--seed", type=int, default=0, help="adapter initialisation and batch order")
    grd.add_argument(
        "--out", type=out_path, help="folder for gradients.json and gradients.png (default runs/analyze/...)"
    )


def run_analyze(args: argparse.Namespace) -> int:
    from asymlora import analysis

    if args.analysis == "gradients":
        return run_analyze_gradients(args)
    if args.analysis == "router":
        return run_analyze_router(args)
    if args.analysis == "similarity":
        out, plot = args.out or args.run_a, analysis.plot_similarity
        check_out_folder(out)
        result = analysis.similarity(args.run_a, args.run_b, i=args.i, j=args.j)
    else:
        if not (args.run / "adapter_init").is_dir():
            raise UsageError(f"{args.run}: no adapter_init/ (runs of asymlora train save it at the start)")
        out, plot = args.out or args.run, analysis.plot_change
        check_out_folder(out)
        result = analysis.change(args.run / "adapter_init", args.run / "adapter")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.analysis}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{args.analysis}.png")
    print(f"wrote {out / (args.analysis + '.json')} and {out / (args.analysis + '.png')}")
    return 0


def run_analyze_router(args: argparse.Namespace) -> int:
    from asymlora.analysis.router import format_router_report
    from asymlora.recipes.router_report import analyze_router
    from asymlora.runfolder import check_is_folder

    for flag in ("limit", "batch_size", "max_length"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    out = args.out or args.run
    check_is_folder(out)
    report = analyze_router(
        args.run, out, limit=args.limit, batch_size=args.batch_size, max_length=args.max_length
    )
    print(
        f"router of {args.run}: {report['method']}, {report['num_experts']} experts, {report['router']} router"
    )
    print("\n".join(format_router_report(report)))
    print(f"wrote {out / 'router.json'}")
    return 0


def check_out_folder(out: Path) -> None:
    """Before any work: ``--out`` may not be a file or lie below one, and plotting needs
    matplotlib (nothing is written when either fails)."""
    from asymlora.analysis.plots import require_matplotlib
    from asymlora.runfolder import check_is_folder

    check_is_folder(out)
    require_matplotlib()


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
    from asymlora.analysis.sharing import GradientExperiment, GradientRun

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
    shares = ["a", "b"] if args.share == "both" else [args.share]
    out = args.out or Path("runs") / "analyze" / _slug(
        f"gradients-{args.model}-{'+'.join(t.name for t in tasks)}"
    )
    check_out_folder(out)
    experiment = GradientRun.prepare(tasks, shares, exp)  # the data, the model, each share's adapter
    out.mkdir(parents=True, exist_ok=True)
    results = {share: experiment.run(share, out / f"train_{share}") for share in shares}
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
# asymlora lm-eval-task


def add_lm_eval_task(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "lm-eval-task", "write an lm-evaluation-harness task (YAML + JSONL) for a task", [
        "asymlora lm-eval-task mine.jsonl --out lm-tasks",
        "lm_eval --model hf --model_args pretrained=BASE,peft=runs/my-run/peft/mine "
        "--include_path lm-tasks --tasks asymlora_mine",
    ])  # fmt: skip
    p.add_argument(
        "task",
        help="a task name, bigbench:<task>, rg:<dataset>, hf:<dataset>?<columns>, or a .json/.jsonl file",
    )
    p.add_argument("--out", type=out_path, required=True, help="folder for <task>.yaml and <task>.jsonl")
    p.add_argument("--split", choices=["test", "all"], default="test",
                   help="the questions written: the task's test split, as asymlora eval scores it, or all")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions")


def run_lm_eval_task(args: argparse.Namespace) -> int:
    from asymlora.eval.harness import write_lm_eval_task

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    yaml_path, n = write_lm_eval_task(get_task(args.task), args.out, split=args.split, seed=args.seed,
                                      limit=args.limit)  # fmt: skip
    print(f"wrote {yaml_path} ({n} questions, {args.split} split); run it with: "
          f"asymlora lm-eval --model_args adapter=RUN_OR_ADAPTER --include_path {args.out} "
          f"--tasks {yaml_path.stem} (or lm_eval --model hf --model_args pretrained=BASE[,peft=PEFT_FOLDER] ...)")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------
# asymlora lm-eval


def add_lm_eval(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "lm-eval", "lm-evaluation-harness's command line (lm_eval) with the asymlora model "
                 "registered: any asymlora adapter, routed ones included, on any lm-eval task", [
        "asymlora lm-eval --model_args adapter=runs/my-run --tasks arc_easy --batch_size 8",
        "asymlora lm-eval --model_args adapter=runs/task-routed,task=social_iqa --tasks social_iqa",
        "asymlora lm-eval --model_args adapter=runs/my-run,dtype=bfloat16 --device cuda "
        "--include_path lm-tasks --tasks asymlora_mine --log_samples --output_path out",
    ])  # fmt: skip
    p.epilog += (
        "\n\nEvery argument after 'lm-eval' is lm-eval's own (see lm_eval run --help); --model defaults to "
        "asymlora and --device to auto.\nThe asymlora model's --model_args: adapter=FOLDER (a run folder, "
        "an asymlora adapter folder or a PEFT LoRA folder; required), task=NAME_OR_INDEX (the adapter task "
        "that answers every question; task-routed adapters only, and required there), pretrained=BASE (default: "
        "the base the adapter records), dtype=auto|bfloat16|float16|float32 (default: a run folder's own), "
        "and lm-eval's batch_size, max_length, truncation, add_bos_token, ... See docs/lm-eval.md."
    )
    p.set_defaults(passes_on=True)  # lm-eval's arguments: args.passed_on


def run_lm_eval(args: argparse.Namespace) -> int:
    from asymlora.recipes.lm_eval_model import run_lm_eval as run

    return run(args.passed_on)


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
    "lm-eval-task": (add_lm_eval_task, run_lm_eval_task),
    "lm-eval": (add_lm_eval, run_lm_eval),
}

DEBUG_ENV = "ASYMLORA_DEBUG"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("asymlora")
    except PackageNotFoundError:  # run from a source tree
        from asymlora import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymlora",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
        epilog="examples:\n  asymlora tasks --offline\n  asymlora train --config configs/demo.yaml --method alora "
        "--out runs/my-run\n  asymlora eval --adapter runs/my-run --suite commonsense",
    )
    parser.add_argument("--version", action="version", version=f"asymlora {version()}")
    debug_help = f"show the traceback of an error (as {DEBUG_ENV}=1 does)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
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
    parser = build_parser()
    args, passed_on = parser.parse_known_args(argv)
    if passed_on and not getattr(args, "passes_on", False):  # only lm-eval takes arguments it does not know
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    args.passed_on = passed_on
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        check_finite_flags(args)
        if args.threads is not None:
            check_threads(args.threads)
        choose_threads(args.threads)
        with checkpoint_requests_noted(args.command):
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
