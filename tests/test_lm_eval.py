"""lm-evaluation-harness scores tiny adapters over a task written by ``asymlora lm-eval-task``
with the same log-likelihood for every choice (within 1e-5) as asymlora's own scorer, and the
same acc, acc_norm and acc_bytes: an exported adapter with lm-eval's ``hf`` model, run as users run
it (``python -m lm_eval`` in its own process), and run folders (softmax-routed and task-routed)
with the ``asymlora`` model through ``asymlora lm-eval``. Skipped without lm-eval (the ``lmeval``
extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asymlora import export_peft, load_adapter, save_adapter, wrap
from asymlora.cli import main
from asymlora.data import get_task
from asymlora.errors import AsymloraError
from asymlora.eval import evaluate_task
from asymlora.eval.runner import task_ids_kwargs
from asymlora.models import load_model
from asymlora.recipes.evaluate import load_for_eval
from lm_eval_helpers import (
    assert_same_scores,
    choice_logprobs,
    lm_eval_output,
    sample_logprobs,
    write_sound_questions,
)
from tiny_models import randomize_adapters

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread in this process, as in lm-eval's own process (OMP_NUM_THREADS=1), whatever
    an earlier test's --threads left: with more, float32 sums taken in another order move the
    log-likelihoods by up to ~3e-5 (docs/lm-eval.md)."""
    before = torch.get_num_threads()
    monkeypatch.setattr("asymlora.threads._from_command_line", 1)  # what asymlora's commands apply
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lm_eval_scores_an_exported_adapter_as_asymlora_does(tmp_path: Path, capsys) -> None:
    base, tok = load_model("tiny-llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = wrap(base, method="mola", num_experts=2, router="task", r=4, target_modules=["q_proj", "v_proj"])
    randomize_adapters(model, scale=1.0)
    export_peft(model, tmp_path / "peft", task=1)

    data = write_sound_questions(tmp_path / "animals.jsonl")
    assert main(["lm-eval-task", str(data), "--out", str(tmp_path / "lm")]) == 0
    assert "8 questions, test split" in capsys.readouterr().out

    ours_model, ours_tok = load_model("tiny-llama")
    ours_model = load_adapter(ours_model, tmp_path / "peft")
    ours = evaluate_task(ours_model, ours_tok, get_task(str(data)))
    our_logprobs = choice_logprobs(ours_model, ours_tok, data)

    out = tmp_path / "lm-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={tmp_path / 'base'},peft={tmp_path / 'peft'},dtype=float32",
         "--tasks", "asymlora_animals", "--include_path", str(tmp_path / "lm"), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, their_logprobs = lm_eval_output(out, "asymlora_animals")
    assert_same_scores(theirs, ours.metrics)  # lm-eval's definitions, each one equal
    assert their_logprobs == pytest.approx(our_logprobs, abs=1e-5)


def train_run(run: Path, tasks: list[Path], *settings: str) -> None:
    """A one-step run of asymlora train on tiny-llama whose adapter then gets random weights (one
    step barely moves B from 0: random weights make the adapter change every log-likelihood)."""
    sets = [a for s in ("adapter.r=4", "adapter.target_modules=['q_proj','v_proj']", "eval.limit=2",
                        "train.batch_size=4", "train.max_length=32", *settings) for a in ("--set", s)]  # fmt: skip
    assert main(["train", "--model", "tiny-llama", "--tasks", ",".join(map(str, tasks)), "--steps", "1",
                 "--out", str(run), *sets]) == 0  # fmt: skip
    model = load_for_eval(None, run).model
    randomize_adapters(model, scale=0.5)
    save_adapter(model, run / "adapter")


def asymlora_lm_eval(model_args: str, tasks: Path, out: Path) -> int:
    """``asymlora lm-eval`` on the task files under ``tasks``, writing results and samples to ``out``."""
    return main(["lm-eval", "--model_args", model_args, "--include_path", str(tasks), "--tasks", "asymlora_animals",
                 "--device", "cpu", "--batch_size", "4", "--output_path", str(out), "--log_samples"])  # fmt: skip


def test_lm_eval_scores_a_softmax_routed_run_as_asymlora_eval_does(tmp_path: Path, capsys) -> None:
    data = write_sound_questions(tmp_path / "animals.jsonl")
    run = tmp_path / "run"
    train_run(run, [data])  # alora, K = 3, the softmax router
    assert main(["lm-eval-task", str(data), "--out", str(tmp_path / "lm")]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--task", str(data), "--json"]) == 0
    (ours,) = json.loads(capsys.readouterr().out)["tasks"]

    assert asymlora_lm_eval(f"adapter={run}", tmp_path / "lm", tmp_path / "out") == 0
    theirs, their_logprobs = lm_eval_output(tmp_path / "out", "asymlora_animals")
    assert_same_scores(theirs, ours["metrics"])
    loaded = load_for_eval(None, run)
    our_logprobs = choice_logprobs(loaded.model, loaded.tokenizer, data)
    assert their_logprobs == pytest.approx(our_logprobs, abs=1e-5)
    base_logprobs = choice_logprobs(*load_model("tiny-llama"), data)
    assert their_logprobs != pytest.approx(base_logprobs, abs=1e-2)  # the routed adapter was applied


def test_lm_eval_routes_a_task_routed_run_to_the_adapter_task_named(tmp_path: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from asymlora.recipes.lm_eval_model import AsymloraLM  # registers the model "asymlora"

    animals = write_sound_questions(tmp_path / "animals.jsonl")
    beasts = write_sound_questions(tmp_path / "beasts.jsonl", word="Beast")
    run = tmp_path / "run"
    train_run(run, [animals, beasts], "adapter.router=task", "adapter.num_experts=2")
    assert main(["lm-eval-task", str(animals), "--out", str(tmp_path / "lm")]) == 0
    loaded = load_for_eval(None, run)
    experts = [choice_logprobs(loaded.model, loaded.tokenizer, animals, task_ids_kwargs(t)) for t in (0, 1)]
    assert experts[0] != pytest.approx(experts[1], abs=1e-2)

    tasks = TaskManager(include_path=str(tmp_path / "lm"), include_defaults=False)  # only ours: fast
    for route, expert in (("beasts", 1), (0, 0)):  # by name or by index
        results = simple_evaluate(model="asymlora", model_args={"adapter": str(run), "task": route},
                                  tasks=["asymlora_animals"], task_manager=tasks, device="cpu", batch_size=4,
                                  log_samples=True)  # fmt: skip
        logprobs = sample_logprobs(results["samples"]["asymlora_animals"])
        assert logprobs == pytest.approx(experts[expert], abs=1e-5)
        assert results["config"]["asymlora"]["route"] == ["animals", "beasts"][expert]
    for model_args, said in ((f"adapter={run}", "--model_args task: this adapter routes by task; choose one of animals, beasts"),
                             (f"adapter={run},task=cats", "--model_args task 'cats': not a task of this run"),
                             (f"adapter={run},task=2", "--model_args task 2: out of range 0..1"),
                             (f"adapter={tmp_path / 'nothing'}", "--model_args adapter="),
                             (f"adapter={run},peft=x", "--model_args peft: not an argument of the asymlora model"),
                             ("pretrained=tiny-llama", "--model_args: give adapter=FOLDER")):  # fmt: skip
        with pytest.raises(AsymloraError) as refused:
            AsymloraLM.create_from_arg_string(model_args, {"device": "cpu"})
        assert str(refused.value).startswith(said) and "\n" not in str(refused.value)
