"""lm-evaluation-harness tasks over the project's own questions.

``write_lm_eval_task`` renders a task's questions exactly as ``asymlora eval`` prompts them into a
JSONL file, and writes an lm-eval YAML task over it. Multiple-choice tasks become
``output_type: multiple_choice`` (scored by log-likelihood, ``acc`` equal to asymlora's);
numeric and text tasks become ``generate_until`` tasks with greedy decoding up to the same stop
strings, scored by exact match (numeric: of the first number in the output). ``acc``, ``acc_norm``
and ``acc_bytes`` are the same computations in both tools (``asymlora.eval.metrics.mc_picks``).
See docs/lm-eval.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from asymlora.data.task import Task
from asymlora.errors import UsageError
from asymlora.eval.metrics import MC_METRICS

TASK_PREFIX = "asymlora_"
NUMBER_PATTERN = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)"


def lm_eval_name(task: Task) -> str:
    return TASK_PREFIX + re.sub(r"[^A-Za-z0-9_]+", "_", task.name).strip("_")


def lm_eval_docs(task: Task, *, split: str = "test", seed: int = 0, limit: int | None = None) -> list[dict]:
    """One JSON object per question: ``query`` (the rendered prompt) and ``choices`` + ``gold``
    (multiple choice) or ``targets`` + ``target`` (generation)."""
    from asymlora.eval.runner import test_examples

    docs = []
    for ex in test_examples(task, split=split, seed=seed, limit=limit):
        doc = {"query": task.prompt(ex)}
        if task.kind == "multiple_choice":
            doc |= {"choices": [c.strip() for c in ex["choices"]], "gold": ex["answer"]}
        else:
            doc |= {"targets": ex["targets"], "target": ex["targets"][0]}
        docs.append(doc)
    return docs


def lm_eval_config(task: Task, data_file: Path) -> dict:
    """The lm-eval YAML task (as a dict) over ``data_file``."""
    if task.score_answer is not None:
        raise UsageError(
            f"task {task.name} is scored by its source's own score_answer (reasoning-gym), which an lm-eval "
            "YAML task cannot call; score it with asymlora eval"
        )
    config = {
        "task": lm_eval_name(task),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "doc_to_text": "query",
        "target_delimiter": " ",
        "metadata": {"version": 1.0, "source": f"asymlora task {task.name} ({task.source})"},
    }
    if task.kind == "multiple_choice":
        return config | {
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in MC_METRICS
            ],
        }
    config |= {
        "output_type": "generate_until",
        "doc_to_target": "target",
        "generation_kwargs": {
            "until": list(task.stop),
            "do_sample": False,
            "max_gen_toks": task.max_new_tokens,
        },
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    if task.kind == "numeric":
        config["filter_list"] = [{"name": "first_number", "filter": [
            {"function": "regex", "regex_pattern": NUMBER_PATTERN, "group_select": 0},
            {"function": "take_first"},
        ]}]  # fmt: skip
    return config


def write_lm_eval_task(
    task: Task, out: str | Path, *, split: str = "test", seed: int = 0, limit: int | None = None
) -> tuple[Path, int]:
    """Write ``<out>/<name>.jsonl`` and ``<out>/<name>.yaml``; return the YAML's path and the number
    of questions. Run it with ``lm_eval --include_path <out> --tasks <name>``."""
    out = Path(out)
    name = lm_eval_name(task)
    data_file = out / f"{name}.jsonl"
    config = lm_eval_config(task, data_file)  # both before anything is written
    docs = lm_eval_docs(task, split=split, seed=seed, limit=limit)
    out.mkdir(parents=True, exist_ok=True)
    data_file.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return yaml_path, len(docs)
