"""The gradient experiment end to end: train a task-routed adapter that shares A (HydraLoRA-shaped)
or B (ALoRA-shaped) on several tasks, and measure each task's gradient on it during training.

At initialisation B = 0, so a shared A has no gradient at all: the measurement is taken after
training steps (``measure_every`` steps, and always at the end). Every snapshot uses the same
measurement examples (the first ``examples`` of each task's training split). Snapshots are then
pooled per module: gradient norms averaged, conflicts and pairs summed (``pool_snapshots``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import AdapterConfig, find_target_modules, wrap
from ..adapters.model import check_adapter_size, check_ranks_fit
from ..data.task import Example, Task, training_examples
from ..errors import InputError
from ..train import TrainConfig, train
from .gradients import SHARES, gradient_conflicts, make_batches
from .metrics import mean


@dataclass
class GradientExperiment:
    """What ``run_gradient_experiment`` trains and measures (defaults: a small CPU run)."""

    model: str = "smollm2-135m"
    steps: int = 20
    batch_size: int = 8
    max_length: int = 128
    lr: float = 1e-3
    seed: int = 0
    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "o_proj"])
    examples: int = 8  # measurement examples per task
    measure_every: int = 0  # 0: only at the end
    split_seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "max_length", "examples", "r"):
            if getattr(self, key) < 1:
                raise InputError(f"{key}={getattr(self, key)} must be >= 1")
        if self.measure_every < 0:
            raise InputError(f"measure_every={self.measure_every} must be >= 0")
        self.train_config()  # refuses a learning rate (or another training setting) out of range

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            max_length=self.max_length,
            lr=self.lr,
            seed=self.seed,
            warmup_steps=0,
            log_every=1,
        )

    def measure_steps(self) -> list[int]:
        every = self.measure_every or self.steps
        return sorted({*range(every, self.steps + 1, every), self.steps})


def pool_snapshots(snapshots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``gradient_conflicts``-shaped result from several of the same model at different steps:
    per module the gradient norms averaged over snapshots (per task), conflicts and pairs summed;
    plus ``layers``: conflicts and pairs per transformer block."""
    if not snapshots:
        raise InputError("no snapshots to pool")
    first = snapshots[0]
    rows = []
    for k, row in enumerate(first["modules"]):
        same = [s["modules"][k] for s in snapshots]
        norms = {
            key: [mean([r[key][t] for r in same]) for t in range(len(row[key]))]
            for key in ("grad_norm_A", "grad_norm_B")
        }
        rows.append(
            {
                "module": row["module"],
                "layer": row["layer"],
                **norms,
                "mean_grad_norm_A": mean(norms["grad_norm_A"]),
                "mean_grad_norm_B": mean(norms["grad_norm_B"]),
                "conflicts": sum(r["conflicts"] for r in same),
                "pairs": sum(r["pairs"] for r in same),
            }
        )
    layers: dict[Any, dict[str, int]] = {}
    for row in rows:
        entry = layers.setdefault(row["layer"], {"conflicts": 0, "pairs": 0})
        entry["conflicts"] += row["conflicts"]
        entry["pairs"] += row["pairs"]
    shared = first["shared_matrix"]
    return {
        "analysis": "gradients",
        "share": first["share"],
        "shared_matrix": shared,
        "method": first["method"],
        "tasks": first["tasks"],
        "snapshots": len(snapshots),
        "total_conflicts": sum(r["conflicts"] for r in rows),
        "total_pairs": sum(r["pairs"] for r in rows),
        "mean_grad_norm_shared": mean([r[f"mean_grad_norm_{shared}"] for r in rows]),
        "mean_grad_norm_A": mean([r["mean_grad_norm_A"] for r in rows]),
        "mean_grad_norm_B": mean([r["mean_grad_norm_B"] for r in rows]),
        "layers": [{"layer": k, **v} for k, v in layers.items()],
        "modules": rows,
    }


def run_gradient_experiment(
    tasks: Sequence[Task],
    share: str,
    exp: GradientExperiment,
    run_dir: str | Path,
    load: Callable[[str], tuple[Any, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a task-routed model sharing A (``share="a"``) or B (``"b"``) on ``tasks`` (one expert
    per task) for ``exp.steps`` steps, measuring ``gradient_conflicts`` at ``exp.measure_steps()``.

    Returns the pooled result (``pool_snapshots``) with ``steps_measured`` and every snapshot under
    ``by_step``. ``run_dir`` receives the training's metrics.jsonl and checkpoint/."""
    return GradientRun.prepare(tasks, [share], exp, load).run(share, run_dir, log)


@dataclass
class GradientRun:
    """A gradient experiment checked against its base model (``prepare``), ready to ``run``
    each share on that one base (the adapters are removed again after each)."""

    tasks: list[Task]
    exp: GradientExperiment
    examples: list[list[Example]]
    base: Any
    tokenizer: Any

    @classmethod
    def prepare(
        cls,
        tasks: Sequence[Task],
        shares: Sequence[str],
        exp: GradientExperiment,
        load: Callable[[str], tuple[Any, Any]] | None = None,
    ) -> GradientRun:
        """Everything that can refuse the experiment, before anything is written: the shares,
        the tasks' data, the model, and each share's adapter (its rank within the target
        modules, its size within the base model's)."""
        for share in shares:
            if share not in SHARES:
                raise InputError(f"share={share!r} must be 'a' (HydraLoRA-shaped) or 'b' (ALoRA-shaped)")
        if len(tasks) < 2:
            raise InputError(f"gradient conflicts need at least 2 tasks, got {len(tasks)}")
        if load is None:
            from ..models import load_model as load
        examples = training_examples(tasks, exp.split_seed)
        base, tokenizer = load(exp.model)
        run = cls(list(tasks), exp, examples, base, tokenizer)
        for share in shares:
            config = run.adapter_config(share)
            check_ranks_fit(base, config, {"r": exp.r})
            targets = find_target_modules(base, config.target_modules, config.layers)
            check_adapter_size(base, config, targets)  # an adapter larger than the base, before allocating
        return run

    def adapter_config(self, share: str) -> AdapterConfig:
        """The task-routed adapter of ``share``: one expert per task, sharing A or B."""
        return AdapterConfig(
            method=SHARES[share][1],
            r=self.exp.r,
            alpha=self.exp.alpha,
            num_experts=len(self.tasks),
            router="task",
            target_modules=list(self.exp.target_modules),
            seed=self.exp.seed,
        )

    def run(self, share: str, run_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
        """Train and measure ``share`` (see ``run_gradient_experiment``)."""
        exp, config = self.exp, self.adapter_config(share)
        model = wrap(self.base, config)
        measured = [ex[: exp.examples] for ex in self.examples]
        batches = make_batches(self.tokenizer, measured, batch_size=exp.batch_size, max_length=exp.max_length)
        at = set(exp.measure_steps())
        by_step: dict[int, dict[str, Any]] = {}

        def on_step(step: int, _: dict) -> None:
            if step in at:
                by_step[step] = gradient_conflicts(model, batches, share)
                log(f"  share {share}: step {step}: {by_step[step]['total_conflicts']} conflicts")

        log(f"share {share}: training {config.method} on {len(self.tasks)} tasks for {exp.steps} steps")
        try:
            train(model, self.tokenizer, self.examples, exp.train_config(), run_dir, on_step=on_step)
        finally:
            model.unload().eval()  # the base as loaded, for the next share
        snapshots = [by_step[s] for s in sorted(by_step)]
        result = pool_snapshots(snapshots)
        result["task_names"] = [t.name for t in self.tasks]
        result["steps_measured"] = sorted(by_step)
        result["by_step"] = {str(s): by_step[s] for s in sorted(by_step)}
        return result
