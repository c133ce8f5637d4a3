"""Scripting: --json on tasks, eval and train (JSON on stdout, nothing else there), and
train --dry-run (the resolved config, the trainable parameters and a memory estimate, nothing
written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asymlora import wrap
from asymlora.adapters import AdapterConfig
from asymlora.cli import main
from asymlora.models import load_model, model_config
from asymlora.recipes.dryrun import activation_bytes
from asymlora.train import TrainConfig
from asymlora.train.loop import token_loss_sum
from tiny_models import write_choice_tasks

SMALL = ["--set", "train.steps=1", "--set", "train.batch_size=2", "--set", "train.max_length=32",
         "--set", "eval.limit=2", "--set", "adapter.r=4"]  # fmt: skip


@pytest.fixture
def tasks(tmp_path: Path) -> str:
    return ",".join(write_choice_tasks(tmp_path / "tasks", n=2, size=10))


def train_args(tasks: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny-llama", "--tasks", tasks, "--out", str(out), *SMALL, *extra]


def test_tasks_json_lists_every_suite_with_the_table_columns(capsys):
    code = main(["tasks", "--offline", "--json"])
    listing = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and set(listing) == {"suites", "unavailable"} and listing["suites"]
    rows = [row for suite in listing["suites"].values() for row in suite]
    assert rows and all({"task", "kind", "train", "test", "source", "status"} <= row.keys() for row in rows)
    counted = [row for row in rows if row["status"] == "counted"]
    assert all(isinstance(row["train"], int) and isinstance(row["test"], int) for row in counted)


def test_eval_json_is_all_of_stdout_and_matches_results_json(tmp_path, tasks, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny-llama", "--task", tasks.split(",")[0], "--limit", "2", "--out", str(out),
                 "--json"]) == 0  # fmt: skip
    said = capsys.readouterr()
    printed = json.loads(said.out)  # all of stdout is one JSON document
    saved = json.loads((out / "results.json").read_text())
    assert printed["results_json"] == str(out / "results.json")
    assert [(t["task"], t["score"]) for t in printed["tasks"]] == [
        (t["task"], t["score"]) for t in saved["tasks"]
    ]
    assert "| task |" in said.err  # the table went to stderr


def test_train_json_summary_then_a_dry_run_refuses_the_held_folder(tmp_path, tasks, capsys):
    out = tmp_path / "run"
    assert main(train_args(tasks, out, "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "results.json").read_text())
    assert (
        printed["output_dir"] == str(out) and printed["trainable_parameters"] == saved["trainable_parameters"]
    )
    assert [t["score"] for t in printed["tasks"]] == [t["score"] for t in saved["tasks"]]
    assert main(train_args(tasks, out, "--dry-run")) == 2  # checked as the run checks it
    assert "holds a run already" in capsys.readouterr().err


def test_dry_run_prints_config_counts_and_estimate_and_writes_nothing(tmp_path, tasks, capsys):
    out = tmp_path / "new" / "run"
    assert main(train_args(tasks, out, "--dry-run", "--method", "alora")) == 0
    text = capsys.readouterr().out
    assert main(train_args(tasks, out, "--dry-run", "--method", "alora", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "new").exists()  # not the folder, nor its lock file beside it

    base, _ = load_model("tiny-llama")
    model = wrap(base, AdapterConfig(**result["config"]["adapter"]))
    count = model.trainable_parameters()
    assert str(count) in text and "train:\n  steps: 1\n" in text and "memory of one training step" in text
    assert (result["trainable_parameters"], result["total_parameters"]) == (count.trainable, count.total)
    memory = result["memory_bytes"]
    assert memory["base_weights"] == 4 * (count.total - count.trainable)  # float32
    assert memory["adapters_and_optimizer"] == 16 * count.trainable  # weights, gradients, 2 AdamW moments
    assert (
        memory["total"] == memory["base_weights"] + memory["adapters_and_optimizer"] + memory["activations"]
    )


def test_the_activation_estimate_is_near_what_autograd_keeps():
    """Without checkpointing, the bytes a training forward of tiny-llama keeps for the backward
    pass (each storage once, weights left out) are within 25 % of the arithmetic."""
    base, _ = load_model("tiny-llama")
    model = wrap(base, AdapterConfig(method="alora", r=8, num_experts=3, target_modules=["q_proj", "o_proj"]))
    ids = torch.randint(3, 200, (4, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "task_ids": None,
             "position_ids": torch.arange(128).expand(4, 128)}  # fmt: skip
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        token_loss_sum(model.train(), batch)
    estimate = activation_bytes(model, model_config("tiny-llama"), TrainConfig(batch_size=4, max_length=128))
    assert 0.75 < sum(storages.values()) / estimate < 1.25
