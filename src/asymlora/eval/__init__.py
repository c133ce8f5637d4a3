"""Evaluation: multiple choice by log-likelihood (raw and length-normalised accuracy), numeric exact
match after greedy generation, ROUGE-1/ROUGE-L for text, and a per-run report."""

from asymlora.eval.config import EvalConfig
from asymlora.eval.metrics import accuracy, extract_number, mc_metrics, mc_picks, numbers_equal, rouge
from asymlora.eval.report import Report, TaskResult, delta_m, summarize
from asymlora.eval.runner import eval_mode, evaluate_task, evaluate_tasks, task_ids_kwargs, test_examples
from asymlora.eval.scoring import ForwardKwargs, continuation_logprobs, greedy_generate

__all__ = [
    "EvalConfig",
    "ForwardKwargs",
    "Report",
    "TaskResult",
    "accuracy",
    "continuation_logprobs",
    "delta_m",
    "eval_mode",
    "evaluate_task",
    "evaluate_tasks",
    "extract_number",
    "greedy_generate",
    "mc_metrics",
    "mc_picks",
    "numbers_equal",
    "rouge",
    "summarize",
    "task_ids_kwargs",
    "test_examples",
]
