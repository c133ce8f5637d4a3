"""kill -9 of ``asymlora train`` at a random moment after its first checkpoint, then ``--resume``:
the final adapter equals that of a run that never stopped, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import torch

from asymlora.adapters import read_tensors
from asymlora.adapters.io import WEIGHTS_FILE
from asymlora.recipes import multitask
from tiny_models import cli_process, lines_in, write_choice_tasks

STEPS = 16


def overrides(out: Path, tasks: list[str]) -> list[str]:
    return [
        'model="tiny-llama"',
        f"output_dir={json.dumps(str(out))}",
        f"data.tasks={json.dumps(tasks)}",
        'adapter.method="alora"',
        'adapter.router="task"',
        "adapter.num_experts=2",
        "adapter.r=4",
        f"train.steps={STEPS}",
        "train.batch_size=2",
        "train.save_every=2",
        "eval.limit=2",
    ]


def train(out: Path, tasks: list[str], resume: bool = False) -> subprocess.Popen:
    return cli_process("train", overrides(out, tasks), resume)


def steps_logged(out: Path) -> int:
    return lines_in(out / "metrics.jsonl")


def test_kill_9_during_training_then_resume_gives_the_same_adapter(tmp_path: Path) -> None:
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=12)
    killed = tmp_path / "killed"
    procs = [train(killed, tasks)]
    try:
        # a random step after the first checkpoint (step 2), then a random moment inside it
        step, delay = random.randint(2, STEPS - 3), random.uniform(0, 0.05)
        while steps_logged(killed) < step and procs[0].poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(timeout=30)
        assert procs[0].returncode == -signal.SIGKILL, procs[0].stderr.read().decode()[-2000:]
        assert not (killed / "results.json").exists(), "the run ended before the kill: nothing was tested"
        multitask.run(
            multitask.load_config(None, overrides(tmp_path / "straight", tasks)), log=lambda _: None
        )

        procs.append(train(killed, tasks, resume=True))
        _, err = procs[1].communicate(timeout=300)
        assert procs[1].returncode == 0, err.decode()[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    got = read_tensors(killed / "adapter" / WEIGHTS_FILE)
    want = read_tensors(tmp_path / "straight" / "adapter" / WEIGHTS_FILE)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), f"killed {delay:.3f} s after step {step}"
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"each step logged once (killed after step {step})"
