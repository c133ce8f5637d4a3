"""lm-evaluation-harness, run as users run it (``python -m lm_eval`` in its own process), scores an
exported tiny adapter over a task written by ``asymlora lm-eval-task``: the same accuracy and the
same log-likelihood for every choice (within 1e-5) as asymlora's own scorer, and the same acc,
acc_norm and acc_bytes. Skipped without lm-eval (the
``lmeval`` extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asymlora import export_peft, load_adapter, wrap
from asymlora.cli import main
from asymlora.data import get_task
from asymlora.data.task import continuation
from asymlora.eval import continuation_logprobs, evaluate_task
from asymlora.eval import test_examples as split_examples
from asymlora.models import load_model
from tiny_models import randomize_adapters

pytest.importorskip("lm_eval")


def test_lm_eval_scores_an_exported_adapter_as_asymlora_does(tmp_path: Path, capsys) -> None:
    base, tok = load_model("tiny-llama")
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = wrap(base, method="mola", num_experts=2, router="task", r=4, target_modules=["q_proj", "v_proj"])
    randomize_adapters(model, scale=1.0)
    export_peft(model, tmp_path / "peft", task=1)

    data = tmp_path / "animals.jsonl"
    words = ["meow", "woof", "moo", "quack"]
    data.write_text("".join(json.dumps({"prompt": f"Animal {i} says", "choices": words, "answer": i % 4}) + "\n"
                            for i in range(40)))  # fmt: skip
    assert main(["lm-eval-task", str(data), "--out", str(tmp_path / "lm")]) == 0
    assert "8 questions, test split" in capsys.readouterr().out

    task = get_task(str(data))
    ours_model, ours_tok = load_model("tiny-llama")
    ours_model = load_adapter(ours_model, tmp_path / "peft")
    ours = evaluate_task(ours_model, ours_tok, task)
    questions = split_examples(task)
    prompts = [task.prompt(ex) for ex in questions for _ in ex["choices"]]
    conts = [continuation(c) for ex in questions for c in ex["choices"]]
    our_logprobs = continuation_logprobs(ours_model, ours_tok, prompts, conts)

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
    (results_file,) = out.rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["asymlora_animals"]
    for metric in ("acc", "acc_norm", "acc_bytes"):  # lm-eval's definitions, each one equal
        assert theirs[f"{metric},none"] * 100 == pytest.approx(ours.metrics[metric], abs=1e-9), metric
    (samples_file,) = out.rglob("samples_asymlora_animals_*.jsonl")
    samples = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    their_logprobs = [float(resp[0][0]) for s in samples for resp in s["resps"]]  # stored as text
    assert their_logprobs == pytest.approx(our_logprobs, abs=1e-5)
