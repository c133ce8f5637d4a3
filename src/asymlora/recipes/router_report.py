"""``asymlora analyze router RUN``: how a trained run's learned routers use their experts on the
run's own training and test prompts, per adapted module, and whether the router has collapsed
(analysis/router.py has the rule). Writes ``router.json``; returns the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..analysis.router import router_report
from ..errors import InputError
from .multitask import MultitaskConfig, load_config, load_run, select_tasks


def run_prompts(cfg: MultitaskConfig, limit: int) -> dict[str, list[str]]:
    """The prompts of the first ``limit`` training examples (at most those the run trained on) and
    the first ``limit`` test questions of each of the run's tasks, as the model reads them."""
    train_limit = min(limit, cfg.data.max_train_per_task or limit)
    prompts: dict[str, list[str]] = {"train": [], "test": []}
    for task in select_tasks(cfg.data):
        splits = task.splits(cfg.data.split_seed)
        for split, n in (("train", train_limit), ("test", limit)):
            rows = splits[split].select(range(min(n, len(splits[split]))))
            prompts[split] += [task.prompt(row) for row in rows]
    return prompts


def analyze_router(
    run: Path, out: Path, *, limit: int = 64, batch_size: int = 8, max_length: int = 1024
) -> dict[str, Any]:
    """The report of ``run``'s routers (see ``router_report``), written to ``out/router.json``.
    A run without a learned router is refused before its model is loaded."""
    if (run / "config.yaml").is_file():
        adapter = load_config(run / "config.yaml").adapter
        if not adapter.learned_router:
            raise InputError(
                f"{run}: its {adapter.method} adapter has no learned router (router: {adapter.router}); "
                "analyze router reports on softmax and topk routers"
            )
    model, tokenizer, cfg, _ = load_run(run)
    report = router_report(
        model, tokenizer, run_prompts(cfg, limit), batch_size=batch_size, max_length=max_length
    )
    report["run"] = str(run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
