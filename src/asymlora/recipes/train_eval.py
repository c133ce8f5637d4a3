"""Evaluation during ``train`` (``eval.every``): each task's scores and validation loss on its test
questions (the first ``eval.limit`` of them, the questions the final evaluation scores), and the
adapter of the best average score kept as ``adapter-best/`` (``eval.keep_best``).

Every evaluation, the final one included, is ``eval/<name>`` scalars in TensorBoard and, with
``eval.every``, a ``{"step": N, "eval": {...}}`` line of ``metrics.jsonl``: ``<task>/<metric>``,
``average`` and, with ``eval.every``, ``<task>/val_loss`` and ``val_loss`` (the mean token loss
of the test answers, over all tasks' tokens). The best adapter is chosen by ``average`` among the
evaluations, the final one included (the earliest wins a tie) and written atomically with
``best.json`` (its step and numbers). It is chosen on test questions, so its score is optimistic
as a test score; the run's ``results.json`` scores the final adapter."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters.io import WEIGHTS_FILE, complete_folder, save_adapter, write_folder_atomically
from ..config import read_json
from ..data.task import Example, Task
from ..eval.config import TrainingEvalConfig
from ..eval.report import Report
from ..eval.runner import test_examples
from ..runfolder import json_line
from ..train import TrainConfig
from ..train.loop import Evaluation, validation_loss

BEST_FOLDER = "adapter-best"
BEST_FILE = "best.json"


@dataclass
class TrainingEvaluation:
    """What an evaluation during ``train`` or at its end records (see the module docstring).
    ``score``: the recipe's evaluation of the model as it stands."""

    model: Any
    tokenizer: Any
    tasks: Sequence[Task]
    train_cfg: TrainConfig
    eval_cfg: TrainingEvalConfig
    split_seed: int
    out: Path
    score: Callable[[], Report]
    validation: list[list[Example]] = field(init=False)

    def __post_init__(self) -> None:
        limit = self.eval_cfg.limit
        self.validation = [
            task.to_examples(test_examples(task, seed=self.split_seed, limit=limit), task_id)
            for task_id, task in enumerate(self.tasks)
        ]

    def during_training(self) -> Evaluation | None:
        """The loop's ``Evaluation`` (None without ``eval.every``)."""
        if self.eval_cfg.every is None:
            return None
        return Evaluation(self.eval_cfg.every, lambda step: self.numbers(step, self.score()))

    def numbers(self, step: int, report: Report) -> dict[str, float]:
        """The named numbers of ``report`` at ``step`` (with the validation loss under
        ``eval.every``); keeps the adapter when it is the best so far (``eval.keep_best``)."""
        scores = {f"{r.task}/{r.metric}": r.score for r in report.results}
        scores["average"] = sum(scores.values()) / len(scores)
        if self.eval_cfg.every is not None:
            scores |= self.validation_losses()
        if self.eval_cfg.keep_best:
            keep_if_best(self.model, self.out, step, scores)
        return scores

    def validation_losses(self) -> dict[str, float]:
        losses = [
            validation_loss(self.model, self.tokenizer, examples, self.train_cfg)
            for examples in self.validation
        ]
        named = {
            f"{task.name}/val_loss": total / max(n, 1)
            for task, (total, n) in zip(self.tasks, losses, strict=True)
        }
        named["val_loss"] = sum(total for total, _ in losses) / max(sum(n for _, n in losses), 1)
        return named


def best_so_far(out: Path) -> dict[str, Any] | None:
    """``best.json`` of the run's kept adapter (``{"step", "eval"}``), None before there is one."""
    folder = complete_folder(out / BEST_FOLDER, (WEIGHTS_FILE, BEST_FILE))
    return None if folder is None else read_json(folder / BEST_FILE)


def keep_if_best(model, out: Path, step: int, scores: dict[str, float]) -> bool:
    """Write ``model``'s adapter as ``adapter-best/`` (atomically, with ``best.json``) when its
    ``average`` beats the kept one's; whether it did."""
    best = best_so_far(out)
    if best is not None and scores["average"] <= best["eval"]["average"]:
        return False

    def fill(tmp: Path) -> None:
        save_adapter(model, tmp)
        (tmp / BEST_FILE).write_text(json_line({"step": step, "eval": scores}))

    write_folder_atomically(out / BEST_FOLDER, fill)
    return True


def log_config(writer, config: dict[str, Any], step: int) -> None:
    """The run's resolved config as TensorBoard text (``config``, at ``step``)."""
    text = yaml.safe_dump(config, sort_keys=False)
    writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), step)  # a code block


def log_hparams(writer, config: dict[str, Any], scores: dict[str, float]) -> None:
    """The config's settings and the final evaluation's numbers in TensorBoard's HParams view
    (the ``hparams`` run under ``tensorboard/``)."""
    metrics = {f"hparam/{name}": value for name, value in scores.items() if "/" not in name}
    writer.add_hparams(flat_settings(config), metrics, run_name="hparams")


def flat_settings(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; lists and None as text (what HParams takes)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flat_settings(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value if isinstance(value, bool | int | float | str) else str(value)
    return flat
