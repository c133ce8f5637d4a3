"""Evaluation during training (``eval.every``, ``eval.keep_best``) on tiny-llama and JSONL task
files: the records in metrics.jsonl and TensorBoard, the validation loss, the kept adapter, the
config's checks and a resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from asymlora import wrap
from asymlora.adapters import AdapterConfig, read_tensors
from asymlora.adapters.io import WEIGHTS_FILE
from asymlora.cli import main
from asymlora.data.task import Example
from asymlora.models import load_model
from asymlora.recipes import multitask
from asymlora.train import TrainConfig
from asymlora.train.loop import validation_loss
from tiny_models import cli_process, lines_in, scalars, write_choice_tasks

TINY = ["--model", "tiny-llama", "--set", "adapter.r=4", "--set", "adapter.target_modules=['q_proj','v_proj']",
        "--set", "eval.limit=3", "--set", "train.batch_size=4", "--set", "train.max_length=32"]  # fmt: skip


def evaluations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval" in r]


def test_eval_every_logs_scores_and_validation_loss_and_keeps_the_best_adapter(tmp_path, capsys) -> None:
    tasks = write_choice_tasks(tmp_path / "data", n=2)
    run = tmp_path / "run"
    assert main(["train", "--tasks", ",".join(tasks), "--steps", "5", "--out", str(run), *TINY,
                 "--set", "eval.every=2", "--set", "eval.keep_best=true"]) == 0  # fmt: skip
    evals = evaluations(run)
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps, and the final evaluation
    names = ["task0", "task1"]
    assert set(evals[0]["eval"]) == {f"{t}/{k}" for t in names for k in ("acc", "val_loss")} | {
        "average",
        "val_loss",
    }
    results = json.loads((run / "results.json").read_text())
    assert [evals[-1]["eval"][f"{t['task']}/acc"] for t in results["tasks"]] == [
        t["score"] for t in results["tasks"]
    ]

    averages = [r["eval"]["average"] for r in evals]
    best = json.loads((run / "adapter-best" / "best.json").read_text())
    assert best["step"] == evals[averages.index(max(averages))]["step"] and best == results["best"]
    assert f"best adapter: step {best['step']}" in capsys.readouterr().out
    # the kept adapter scores what best.json says on the same questions
    assert main(["eval", "--adapter", str(run / "adapter-best"), "--task", tasks[0], "--task", tasks[1],
                 "--limit", "3", "--json"]) == 0  # fmt: skip
    scored = json.loads(capsys.readouterr().out)
    assert [t["score"] for t in scored["tasks"]] == [best["eval"][f"{t}/acc"] for t in names]

    logged = scalars(run / "tensorboard")
    assert logged["eval/val_loss"] == [(r["step"], pytest.approx(r["eval"]["val_loss"])) for r in evals]
    assert [step for step, _ in logged["eval/task0/acc"]] == [2, 4, 5]
    assert (run / "tensorboard" / "hparams").is_dir()  # the HParams view


def test_the_config_is_tensorboard_text(tmp_path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tasks = write_choice_tasks(tmp_path / "data", n=2)
    run = tmp_path / "run"
    assert main(["train", "--tasks", ",".join(tasks), "--steps", "2", "--out", str(run), *TINY]) == 0
    events = accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "steps: 2" in text and "model: tiny-llama" in text
    assert not evaluations(run)  # without eval.every, metrics.jsonl holds the training steps only


def test_validation_loss_is_the_models_own_loss_on_the_answers() -> None:
    base, tokenizer = load_model("tiny-llama")
    model = wrap(base, AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    examples = [Example("Twice 3 is", " 6"), Example("The sky is usually", " blue today")]
    total, tokens = validation_loss(model, tokenizer, examples, TrainConfig(batch_size=2))
    want_total, want_tokens = 0.0, 0
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = prompt + answer, [-100] * len(prompt) + answer  # the answer and EOS are scored
        with torch.no_grad():
            out = base(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(label != -100 for label in labels[1:])
        want_total, want_tokens = want_total + float(out.loss) * n, want_tokens + n
    assert tokens == want_tokens and total == pytest.approx(want_total, rel=1e-5)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("eval.every=0", "eval.every=0 must be >= 1 (leave it out to evaluate only at the end)"),
        ("eval.every=-3", "eval.every=-3 must be >= 1"),
        ("eval.every=9", "eval.every=9 is more than train.steps=5"),
        ("eval.keep_best=true", "eval.keep_best=true needs eval.every"),
    ],
)
def test_bad_eval_settings_are_one_line(tmp_path, capsys, setting, message) -> None:
    tasks = write_choice_tasks(tmp_path / "data", n=2)
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--tasks", ",".join(tasks), "--steps", "5", "--out", str(run), *TINY, "--set", setting]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not run.exists()


def overrides(out: Path, tasks: list[str]) -> list[str]:
    return [
        'model="tiny-llama"', f"output_dir={json.dumps(str(out))}", f"data.tasks={json.dumps(tasks)}",
        "adapter.r=4", "train.steps=12", "train.batch_size=2", "train.save_every=2", "eval.limit=2",
        "eval.every=2", "eval.keep_best=true",
    ]  # fmt: skip


def test_kill_9_then_resume_evaluates_each_step_once_as_a_run_that_never_stopped(tmp_path) -> None:
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=12)
    killed = tmp_path / "killed"
    proc = cli_process("train", overrides(killed, tasks))
    try:
        while lines_in(killed / "metrics.jsonl") < 9 and proc.poll() is None:  # past the step-6 evaluation
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (killed / "results.json").exists(), "the run ended before the kill: nothing was tested"
        multitask.run(
            multitask.load_config(None, overrides(tmp_path / "straight", tasks)), log=lambda _: None
        )
        resumed = cli_process("train", overrides(killed, tasks), resume=True)
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err.decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    straight = evaluations(tmp_path / "straight")
    assert [r["step"] for r in evaluations(killed)] == [2, 4, 6, 8, 10, 12] == [r["step"] for r in straight]
    assert evaluations(killed) == straight  # the same numbers: the resumed run is the same run
    got, want = (read_tensors(run / "adapter-best" / WEIGHTS_FILE) for run in (killed, tmp_path / "straight"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((killed / "adapter-best" / "best.json").read_text()) == json.loads(
        (tmp_path / "straight" / "adapter-best" / "best.json").read_text()
    )
