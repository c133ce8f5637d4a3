"""Progress where people look: bars in train (per step), eval (per batch), federate rounds (per
client) and compare (per cell), all drawn by asymlora.progress (on a terminal, or as
ASYMLORA_PROGRESS says); TensorBoard logs of eval scores and federated rounds; whole rounds on the
round axis."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from asymlora.cli import main
from asymlora.data import Task, mc_record
from asymlora.eval import evaluate_task
from asymlora.models import load_model
from asymlora.recipes.federated import score_figure
from tiny_models import scalars, write_choice_tasks

TINY = ["--model", "tiny-llama", "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.max_length=32",
        "--set", "eval.limit=2", "--set", "adapter.r=4", "--set", "adapter.target_modules=['q_proj','v_proj']"]  # fmt: skip


@pytest.fixture(autouse=True)
def bars_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bars are drawn on terminals only; this makes them draw into the captured stderr too."""
    monkeypatch.setenv("ASYMLORA_PROGRESS", "1")


def test_eval_shows_a_bar_that_advances_per_batch(capsys) -> None:
    model, tok = load_model("tiny-llama")
    task = Task(
        "yesno", "multiple_choice", lambda: [mc_record(f"q{i}:", ["yes", "no"], i % 2) for i in range(6)]
    )
    evaluate_task(model, tok, task, task.examples(), batch_size=4)
    err = capsys.readouterr().err
    assert (
        "eval yesno" in err and "0/12" in err and "8/12" in err
    )  # 6 questions x 2 choices, 4 questions per batch


def test_federate_shows_clients_per_round_and_logs_rounds(tmp_path, capsys) -> None:
    files = write_choice_tasks(tmp_path / "data", n=3)
    out = tmp_path / "fed"
    assert main(["federate", "--method", "fedalora", "--tasks", ",".join(files), "--rounds", "2",
                 "--out", str(out), *TINY]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "round 1/2" in err and "round 2/2" in err and "3/3" in err
    logged = scalars(out / "tensorboard")
    assert [step for step, _ in logged["federate/loss"]] == [1, 2]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    evaluated = [(r["round"], pytest.approx(r["average"])) for r in rounds if "average" in r]
    assert evaluated and logged["federate/personalised_average"] == evaluated


def test_train_logs_eval_scores_and_compare_shows_cells(tmp_path, capsys) -> None:
    files = write_choice_tasks(tmp_path / "data", n=2)
    out = tmp_path / "cmp"
    assert main(["compare", "--tasks", ",".join(files), "--methods", "lora,alora", "--seeds", "0",
                 "--out", str(out), *TINY]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "compare:  50%" in err and "compare: 100%" in err and "2/2" in err
    results = json.loads((out / "lora" / "seed-0" / "results.json").read_text())
    logged = scalars(out / "lora" / "seed-0" / "tensorboard")
    for task in results["tasks"]:
        assert logged[f"eval/{task['task']}/acc"] == [(2, pytest.approx(task["score"]))]
    assert "train/loss" in logged and (out / "lora" / "seed-0" / "loss.png").is_file()


def test_the_round_axis_has_whole_rounds_only() -> None:
    evaluated = [{"round": r, "average": 50.0 + r, "global_average": None} for r in (1, 2, 3)]
    ax = score_figure(evaluated, "round", "round", "fedalora").axes[0]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def train_stderr(tmp_path: Path, progress: str | None, terminal: bool) -> str:
    """The stderr of ``asymlora train`` (2 steps of tiny-llama) run in a process of its own, with
    ``ASYMLORA_PROGRESS`` set to ``progress`` (None: unset) and stderr a pipe or a terminal (a pty)."""
    files = write_choice_tasks(tmp_path / "data", n=2)
    argv = [sys.executable, "-m", "asymlora.cli", "train", "--tasks", ",".join(files), "--out", str(tmp_path / "run"),
            "--threads", "1", *TINY]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "ASYMLORA_PROGRESS"} | {"OMP_NUM_THREADS": "1"}
    if progress is not None:
        env["ASYMLORA_PROGRESS"] = progress
    if not terminal:
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
        assert done.returncode == 0, done.stderr.decode()
        return done.stderr.decode()
    return _terminal_stderr(argv, env)


def _terminal_stderr(argv: list[str], env: dict[str, str], timeout: float = 300) -> str:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100 characters
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        assert proc.wait(timeout=10) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def redrawn(text: str) -> list[str]:
    """The bars drawn over and over: what follows a carriage return that ends no line (a
    terminal's own line ends are \\r\\n)."""
    return re.findall(r"\r(?!\n)([^\r\n]*)", text)


def test_a_piped_train_draws_no_bars(tmp_path) -> None:
    err = train_stderr(tmp_path, progress=None, terminal=False)
    assert "\r" not in err and "train:" not in err


@pytest.mark.parametrize("progress, shown", [(None, True), ("0", False)])
def test_a_terminal_shows_the_train_bar_unless_progress_is_0(tmp_path, progress, shown) -> None:
    bars = redrawn(train_stderr(tmp_path, progress=progress, terminal=True))
    assert any(b.startswith("train:") for b in bars) is shown
    assert bool(bars) is shown  # =0 hides the evaluation bars too
