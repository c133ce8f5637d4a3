"""The same loop under torchrun with 2 processes (gloo on CPU), called as a library and as the
command (``torchrun -m asymlora train``, ``torchrun $(which asymlora) train``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import write_choice_tasks

HERE = Path(__file__).parent


def run(cmd: list[str], env: dict, timeout: float = 300) -> None:
    """Run in its own process group and kill the whole group on timeout (no orphaned workers)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        assert proc.wait(timeout=timeout) == 0, f"{cmd} failed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_processes_end_with_identical_adapters_equal_to_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run([*torchrun, str(HERE / "ddp_worker.py"), str(tmp_path / "ddp")], env)
    run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "one")], env)
    rank0, rank1 = (
        load_file(tmp_path / "ddp" / "rank0.safetensors"),
        load_file(tmp_path / "ddp" / "rank1.safetensors"),
    )
    single = load_file(tmp_path / "one" / "rank0.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-6)


def asymlora_cli(tmp_path: Path, out: str, *extra: str) -> list[str]:
    """``asymlora train`` of tiny-llama on two task files for 3 steps of 4 examples (2 per process
    under torchrun), without dropout (whose draws differ between processes)."""
    files = write_choice_tasks(tmp_path / "data", n=2)
    return ["train", "--model", "tiny-llama", "--tasks", ",".join(files), "--steps", "3", "--out", str(tmp_path / out),
            "--method", "alora", "--set", "train.batch_size=4", "--set", "train.max_length=32",
            "--set", "adapter.r=4", "--set", "adapter.dropout=0", "--set", "eval.limit=2",
            "--set", "adapter.target_modules=['q_proj','v_proj']", *extra]  # fmt: skip


def finished(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run in its own process group, output captured; the whole group is killed on timeout."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def adapter_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("launch", ["-m asymlora", "$(which asymlora)"])
def test_the_command_under_torchrun_equals_one_process(tmp_path, launch):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASYMLORA_PROGRESS": "0"}
    script = Path(sys.executable).parent / "asymlora"
    if launch.startswith("$") and not script.is_file():
        pytest.skip(f"no console script at {script} (the package is not installed)")
    program = ["-m", "asymlora"] if launch.startswith("-m") else [str(script)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *program]
    ddp = finished([*torchrun, *asymlora_cli(tmp_path, "ddp")], env)
    assert ddp.returncode == 0, ddp.stderr
    one = finished([sys.executable, "-m", "asymlora", *asymlora_cli(tmp_path, "one")], env)
    assert one.returncode == 0, one.stderr
    assert ddp.stdout.count("run folder:") == 1 and "(rank 0 of 2 processes)" in ddp.stdout
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    ddp_adapter, single = adapter_of(tmp_path / "ddp"), adapter_of(tmp_path / "one")
    assert ddp_adapter.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp_adapter[key], single[key], rtol=1e-4, atol=1e-6)

    again = finished([*torchrun, *asymlora_cli(tmp_path, "ddp")], env)  # the folder holds a run now
    assert again.returncode != 0
    said = [line for line in again.stderr.splitlines() if line.startswith("asymlora train: error:")]
    assert any("holds a run already" in line for line in said)  # rank 0, in one line
    rank_1 = "rank 1: rank 0 stopped before training (its error says why)"
    assert all(
        "holds a run already" in line or rank_1 in line for line in said
    )  # torchrun may end rank 1 first
    assert "/asymlora/" not in again.stderr  # no traceback of asymlora's (torchrun's launcher prints its own)
