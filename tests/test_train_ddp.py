"""The same loop under torchrun with 2 processes (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

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
