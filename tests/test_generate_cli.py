"""asymlora generate on tiny-llama: run, asymlora and PEFT folders, --model, a JSONL file of prompts
in batches written as JSONL, sampling options, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asymlora.cli import main
from tiny_models import write_choice_tasks

PROMPTS = ["t0 q1:", "a much longer prompt than the others, t1 q3:", "x", "t1 q0: yes or no?", "hello"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gen")
    tasks = write_choice_tasks(tmp / "data", n=2)
    out = tmp / "run"
    assert main(["train", "--model", "tiny-llama", "--tasks", ",".join(tasks), "--method", "lora", "--steps", "2",
                 "--out", str(out), "--set", "adapter.r=4", "--set", "eval.limit=2",
                 "--set", "train.batch_size=2", "--set", "train.max_length=32"]) == 0  # fmt: skip
    return out


def one(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["generate", *args, "--max-new-tokens", "6"]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_a_prompts_file_in_batches_equals_each_prompt_alone_for_every_kind_of_folder(run, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    alone = [one(capsys, "--adapter", str(run), "--prompt", p) for p in PROMPTS]
    for folder in (run, run / "adapter", run / "peft" / "all-tasks"):
        out = tmp_path / f"{folder.name}.jsonl"
        one(
            capsys,
            "--adapter",
            str(folder),
            "--prompts",
            str(prompts),
            "--batch-size",
            "2",
            "--out",
            str(out),
        )
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == list(range(5)) and [r["prompt"] for r in rows] == PROMPTS
        assert [r["output"] for r in rows] == alone, folder
    printed = one(capsys, "--adapter", str(run), "--prompts", str(prompts), "--model", "tiny-llama")
    assert [json.loads(line)["output"] for line in printed.splitlines()] == alone  # no --out: stdout
    base = one(capsys, "--model", "tiny-llama", "--prompt", PROMPTS[0])  # the base model alone
    assert isinstance(base, str)


def test_sampling_with_a_seed_repeats_and_differs_from_greedy(run, capsys):
    sample = ["--adapter", str(run), "--prompt", "hello", "--do-sample", "--temperature", "5", "--top-p", "1"]
    first = one(capsys, *sample, "--seed", "3")
    assert one(capsys, *sample, "--seed", "3") == first
    others = {one(capsys, *sample, "--seed", str(seed)) for seed in range(4, 8)}
    assert others - {first}  # a hot temperature over random weights: other seeds, other samples


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "x", "--temperature", "0.5"], "add --do-sample"),
        (
            ["--prompt", "x", "--do-sample", "--temperature", "0"],
            "--temperature 0.0: give a finite number > 0",
        ),
        (["--prompt", "x", "--do-sample", "--top-p", "1.5"], "--top-p 1.5: give a number in (0, 1]"),
        (["--prompt", "x", "--out", "o.jsonl"], "--out writes the answers to --prompts"),
        (["--prompt", "x", "--batch-size", "0"], "batch_size=0 must be at least 1"),
    ],
)
def test_bad_options_are_one_line(run, capsys, args, message):
    assert main(["generate", "--adapter", str(run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bad_prompt_files_are_one_line_naming_the_line(run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    for text, message in [('{"prompt": "a"}\n{"text": "b"}\n', 'bad.jsonl:2: needs a "prompt" string'),
                          ('{"prompt": "a", "output": "mine"}\n', 'bad.jsonl:1: already has an "output"')]:  # fmt: skip
        bad.write_text(text)
        out = tmp_path / "out.jsonl"
        assert main(["generate", "--adapter", str(run), "--prompts", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not out.exists()
