"""benchmarks/paper_scale.py keeps working: the same code as the GPU run, on a tiny Llama on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_paper_scale_runs_every_variant_with_and_without_checkpointing(tmp_path):
    out = tmp_path / "paper_scale.json"
    args = ["--shape", "tiny", "--set", "num_hidden_layers=2", "--batch", "3", "--tokens", "16", "--rounds", "1",
            "--steps", "1", "--threads", "1", "--federated", "--cast-profile", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_scale.py"), *args],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["layers"] == 2 and result["dtype"] == "bfloat16" and result["device"] == "cpu"
    names = ["PEFT LoRA", "our LoRA", "our ALoRA", "per-expert ALoRA", "our HydraLoRA", "our MoLA",
             "task-routed ALoRA single-task", "task-routed ALoRA mixed-task", "our LoRA fp32-compute", "our LoRA autocast"]  # fmt: skip
    cells = result["cells"]
    assert set(cells) == {n + suffix for n in names for suffix in ("", " | checkpointing")}
    for name, cell in cells.items():
        assert cell["seconds"] > 0 and cell["peak_total_gib"] > 0, name
    for name in names:  # checkpointing keeps less for the backward pass, whatever the adapter
        assert (
            cells[name + " | checkpointing"]["saved_for_backward_gib"] < cells[name]["saved_for_backward_gib"]
        )
    assert "time our ALoRA / PEFT LoRA | checkpointing" in result["ratios"]
    for name, casts in result["cast_profile"].items():  # CPU time here; device time on a GPU
        assert casts["clock"] == "cpu" and 0 < casts["cast_s"] < casts["step_s"], name
    fed = result["federated"]
    assert fed["clients"] == 8 and fed["swap_s"] > 0 and fed["client_state_mib"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variants", "our LoRA,QLoRA"], "--variants: unknown QLoRA"),
        (["--set", "hidden=64"], "--set hidden=64: give KEY=INTEGER with a field of the tiny config"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(args, message):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_scale.py"), "--shape", "tiny", *args],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
