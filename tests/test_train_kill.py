"""kill -9 of ``asymlora train`` at a random moment after its first checkpoint, then ``--resume``:
the final adapter equals that of a run that never stopped, bit for bit."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from asymlora.adapters import read_tensors
from asymlora.adapters.io import WEIGHTS_FILE
from asymlora.recipes import multitask
from tiny_models import cli_process, lines_in, write_choice_tasks

STEPS = 16


def overrides(out: Path, tasks: list[str], steps: int = STEPS, save_every: int = 2) -> list[str]:
    return [
        'model="tiny-llama"',
        f"output_dir={json.dumps(str(out))}",
        f"data.tasks={json.dumps(tasks)}",
        'adapter.method="alora"',
        'adapter.router="task"',
        "adapter.num_experts=2",
        "adapter.r=4",
        f"train.steps={steps}",
        "train.batch_size=2",
        f"train.save_every={save_every}",
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


def test_usr1_asks_for_a_checkpoint_after_the_current_step_and_training_goes_on(tmp_path: Path) -> None:
    """kill -USR1 during training (periodic checkpoints off): a checkpoint of the step it ends,
    written at once; training goes on to the end; and a run resumed from that checkpoint alone
    ends with the same adapter, bit for bit (the checkpoint is a whole state, not a partial one)."""
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=12)
    run, steps = tmp_path / "run", 300
    args = [*overrides(run, tasks, steps, save_every=0), "train.log_every=1"]
    proc = cli_process("train", args)
    state = run / "checkpoint" / "trainer_state.json"
    try:
        while steps_logged(run) < 5 and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        asked_at = json.loads(state.read_text())["step"]
        shutil.copytree(run / "checkpoint", tmp_path / "copy" / "checkpoint")
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert 5 <= asked_at < steps, "the checkpoint came with the signal, not at the end"
    assert f"checkpoint at step {asked_at} (asked for by a signal)" in err.decode()
    assert json.loads(state.read_text())["step"] == steps, "training went on after it"
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "copy", resumed)
    shutil.copy(run / "config.yaml", resumed / "config.yaml")
    again = cli_process("train", [*overrides(resumed, tasks, steps, save_every=0), "train.log_every=1"], True)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-2000:]
    got = read_tensors(resumed / "adapter" / WEIGHTS_FILE)
    want = read_tensors(run / "adapter" / WEIGHTS_FILE)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_usr1_outside_training_is_noted_not_fatal(capfd) -> None:
    """The CLI's handler: the signal while no loop trains is noted on stderr and ignored; a
    training loop takes it over and gives it back."""
    from asymlora.checkpoint_signal import CHECKPOINT_SIGNAL, checkpoint_requests, checkpoint_requests_noted

    with checkpoint_requests_noted("eval"):
        os.kill(os.getpid(), CHECKPOINT_SIGNAL)
        time.sleep(0.05)
        with checkpoint_requests() as asked:
            assert not asked()
            os.kill(os.getpid(), CHECKPOINT_SIGNAL)
            time.sleep(0.05)
            assert asked() and not asked(), "once per signal"
            os.kill(os.getpid(), CHECKPOINT_SIGNAL)
            os.kill(os.getpid(), CHECKPOINT_SIGNAL)
            time.sleep(0.05)
            assert asked() and not asked(), "signals that come together: one request"
        os.kill(os.getpid(), CHECKPOINT_SIGNAL)
        time.sleep(0.05)
    err = capfd.readouterr().err
    assert (
        err.count("asymlora eval: no training step is running (nothing to checkpoint); signal ignored") == 2
    )


def test_the_cli_survives_usr1_while_a_command_runs() -> None:
    """``asymlora.cli.main`` notes the signal for every command (here one that sends it to itself
    where a real one would be evaluating): exit status 0, not death by the signal."""
    code = (
        "import os, signal, sys\n"
        "from asymlora import cli\n"
        "add, _ = cli.COMMANDS['tasks']\n"
        "cli.COMMANDS['tasks'] = (add, lambda args: os.kill(os.getpid(), signal.SIGUSR1) or 0)\n"
        "sys.exit(cli.main(['tasks']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        "asymlora tasks: no training step is running (nothing to checkpoint); signal ignored" in done.stderr
    )
