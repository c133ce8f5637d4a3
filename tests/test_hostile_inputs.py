"""Hostile input through the command line, by kind: memory blow-ups, library errors, non-finite and
out-of-range numbers, run folders overwritten or mixed up, task names that collide.

Every refusal is checked for three things: exit status 2, no traceback in stderr (the error is one
line), and the run folder byte for byte (and mode for mode) as it was."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tests.locks import held_by_another_process

from asymlora.adapters import read_tensors, save_adapter, wrap
from asymlora.adapters.io import CONFIG_FILE, WEIGHTS_FILE
from asymlora.cli import main
from asymlora.config import ConfigError, apply_overrides, parse_override, read_file
from asymlora.data import bigbench
from asymlora.data.formats import file_task
from asymlora.data.registry import get_task, get_tasks, unique_names
from asymlora.data.task import DataFormatError, Task, check_task_name
from asymlora.errors import InputError
from asymlora.fedconfig import load_config as fed_load_config
from asymlora.recipes.evaluate import load_for_eval, route_tasks
from asymlora.threads import cores
from tiny_models import tiny_model, write_choice_tasks

TINY = ["--model", "tiny-llama", "--set", "adapter.r=4", "--set", "adapter.target_modules=['q_proj','v_proj']",
        "--set", "eval.limit=2", "--set", "eval.batch_size=2", "--set", "train.batch_size=2",
        "--set", "train.max_length=32"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]] | None:
    """Every file and folder under ``folder`` with its bytes and mode (None: no such folder)."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<folder>", p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
    } | {".": (b"<folder>", folder.stat().st_mode)}


def refused(capsys, argv: list[str], says: str, folder: Path | None = None) -> str:
    """Run ``asymlora ARGV``: exit 2, one error line naming ``says``, no traceback, ``folder``
    unchanged. Returns the error line."""
    before = snapshot(folder) if folder is not None else None
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"asymlora {argv[0]}: error: ") and says in last, err[-2000:]
    if folder is not None:
        assert snapshot(folder) == before, f"{folder} changed"
    return last


def train_args(out: Path, tasks: list[str], *extra: str, steps: int = 2) -> list[str]:
    return ["train", "--tasks", ",".join(tasks), "--steps", str(steps), "--out", str(out), *TINY, *extra]


def fed_args(out: Path, tasks: list[str], *extra: str) -> list[str]:
    return ["federate", "--method", "fedalora", "--tasks", ",".join(tasks), "--rounds", "1", "--out", str(out),
            *TINY, "--set", "eval.every=0", "--set", "eval.global_model=false", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[str]:
    return write_choice_tasks(tmp_path_factory.mktemp("tasks"), n=2, size=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tasks) -> Path:
    """A finished train run (alora, learned softmax router, a checkpoint at every step)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(out, tasks, "--set", "train.save_every=1")) == 0
    return out


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory, tasks) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fed"
    assert main(fed_args(out, tasks)) == 0
    return out


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tasks) -> Path:
    """A finished train run routed by task (one expert per task)."""
    out = tmp_path_factory.mktemp("runs") / "routed"
    assert (
        main(train_args(out, tasks, "--set", "adapter.router='task'", "--set", "adapter.num_experts=2")) == 0
    )
    return out


def copy_of(folder: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(folder), str(to)], check=True)
    return to


# --- 1. memory blow-ups -----------------------------------------------------------------------------
LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_a_billion_laughs_config_is_refused_quickly_under_a_memory_limit(tmp_path):
    config = tmp_path / "laughs.yaml"
    config.write_text(LAUGHS)  # 9^9 = 387 million strings once expanded
    assert len(config.read_bytes()) < 600

    def limit_memory() -> None:  # 4 GiB of address space: torch's import fits, the expansion does not
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "asymlora.cli", "train", "--config", str(config), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=ENV, preexec_fn=limit_memory, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "aliases expand to more than" in proc.stderr
    assert time.monotonic() - start < 120
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, says",
    [
        ("a: &a [*a]\n", "a cycle"),
        ("x: &x {p: &p [1, 2]}\n" + "".join(f"y{i}: [*x, *x, *x, *x, *x, *x, *x, *x]\n" for i in range(2)), "unknown key"),
        ("", "is empty"),
        ("---\n...\n", "is empty"),
        ("train: {steps: [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}\n", "train.steps: expected int"),
    ],
)  # fmt: skip
def test_yaml_aliases_cycles_and_empty_files_give_one_line(tmp_path, capsys, text, says):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    refused(
        capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")], says, tmp_path / "run"
    )


@pytest.mark.parametrize(
    "setting, says",
    [
        ("adapter.r=100000000", "adapter.r=100000000: above 64"),
        ("adapter.num_experts=100000", "would hold 512,003,072 parameters, more than the 624,128"),
        ("adapter.r=100", "adapter.r=100: above 64"),  # tiny-llama's v_proj is 128 -> 64
        ("adapter.r=99999999999999999999999", "out of range"),
        ("train.seed=-99999999999999999999999", "out of range"),
        ("train.batch_size=100000000", "one training step needs about"),
        ("train.max_length=1000000000", "lower train.batch_size or train.max_length"),
    ],
)
def test_sizes_that_would_allocate_too_much_are_refused_before_allocating(
    tmp_path, capsys, tasks, setting, says
):
    start = time.monotonic()
    refused(capsys, train_args(tmp_path / "run", tasks, "--set", setting), says, tmp_path / "run")
    assert not (tmp_path / "run").exists() and time.monotonic() - start < 60


@pytest.mark.parametrize("setting", ["train.batch_size=100000000", "train.max_length=1000000000"])
def test_a_federation_whose_step_cannot_fit_is_refused_before_loading(tmp_path, capsys, tasks, setting):
    refused(capsys, fed_args(tmp_path / "fed", tasks, "--set", setting), "one training step needs about")
    assert not (tmp_path / "fed").exists()


def test_a_model_folder_of_a_huge_model_is_refused_before_its_weights_are_read(tmp_path, capsys, tasks):
    """A config.json of a 1.3-trillion-parameter Llama, with no weights beside it: the memory check
    reads only the config, so the refusal comes before transformers looks for the weights."""
    folder = tmp_path / "huge"
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32768,
              "intermediate_size": 131072, "num_hidden_layers": 96, "num_attention_heads": 256,
              "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "bfloat16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    argv = train_args(
        tmp_path / "run", tasks, "--model", str(folder), "--set", "adapter.target_modules=['q_proj']"
    )
    refused(capsys, argv, "one training step needs about", tmp_path / "run")


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--method", "flora", "--ranks", "4,100"], "adapter.ranks[1]=100: above 64"),
        (["--set", "adapter.d_m=1000", "--method", "fedalora-het"], "adapter.d_m=1000: above 64"),
        (["--method", "fedalora", "--set", "adapter.r=10000000"], "adapter.r=10000000: above 64"),
    ],
)
def test_federated_ranks_are_bounded_by_the_layers(tmp_path, capsys, tasks, extra, says):
    args = fed_args(tmp_path / "fed", tasks)
    args.remove("fedalora"), args.remove("--method")
    refused(capsys, [*args, *extra], says, tmp_path / "fed")


# --- 2. library errors reach the user as one line ----------------------------------------------------
def test_exporting_a_learned_router_adapter(tmp_path, capsys, run):
    refused(capsys, ["export", str(run), str(tmp_path / "peft")], "learned softmax router", tmp_path / "peft")


@pytest.mark.parametrize("damage", ["truncated", "mis-shaped", "not json", "alpha NaN", "huge rank", "alpha 1e300",
                                    "NaN weights", "infinite weights"])  # fmt: skip
def test_a_damaged_adapter_in_a_run_folder(tmp_path, capsys, run, damage):
    copy = copy_of(run, tmp_path / "run")
    weights, config = copy / "adapter" / WEIGHTS_FILE, copy / "adapter" / CONFIG_FILE
    data = json.loads(config.read_text())
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "mis-shaped":
        bad = wrap(tiny_model("llama"), method="alora", num_experts=3, r=2, target_modules=["q_proj"])
        save_adapter(bad, tmp_path / "other")
        weights.write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    elif damage == "not json":
        config.write_bytes(b"\xff\xfe{")
    elif damage == "alpha NaN":
        config.write_text(json.dumps({**data, "alpha": float("nan")}))
    elif damage == "alpha 1e300":
        config.write_text(json.dumps({**data, "alpha": 1e300}))
    elif damage.endswith("weights"):
        tensors = read_tensors(weights)
        first = sorted(tensors)[0]
        tensors[first][0, 0] = float("nan") if damage == "NaN weights" else float("inf")
        save_file(tensors, str(weights))
    else:
        config.write_text(json.dumps({**data, "r": 10**9}))
    says = {"truncated": "truncated or corrupted", "mis-shaped": "does not match", "not json": "not valid JSON",
            "alpha NaN": "alpha=nan must be a finite number", "huge rank": "does not match",
            "alpha 1e300": "gives the scale alpha / r = 2.5e+299; at most 1000 is taken",
            "NaN weights": "holds NaN or infinite values", "infinite weights": "holds NaN or infinite values"}[damage]  # fmt: skip
    refused(capsys, ["generate", "--adapter", str(copy), "--prompt", "hi"], says, copy)


@pytest.mark.parametrize("damage", ["optimizer", "state", "step", "counts"])
def test_a_damaged_checkpoint_on_resume(tmp_path, capsys, run, tasks, damage):
    copy = copy_of(run, tmp_path / "run")
    checkpoint = copy / "checkpoint"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if damage == "optimizer":
        (checkpoint / "optimizer.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    elif damage == "state":
        (checkpoint / "trainer_state.json").write_text('{"step": 2, "mixer')
    elif damage == "step":
        (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "step": 10**6}))
    else:
        (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "mixer_counts": [-1, 3]}))
    says = {"optimizer": "not a checkpoint of this run", "state": "not valid JSON",
            "step": "at step 1000000", "counts": "not a trainer state"}[damage]  # fmt: skip
    refused(capsys, train_args(copy, tasks, "--resume", "--set", "train.save_every=1"), says, copy)


def test_a_federation_checkpoint_with_an_absurd_round(tmp_path, capsys, fed_run, tasks):
    copy = copy_of(fed_run, tmp_path / "fed")
    state = copy / "checkpoint" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "round": 10**6}))
    refused(capsys, fed_args(copy, tasks, "--resume"), "after round 1000000", copy)


def test_out_pointing_at_a_file_and_files_that_are_not_text(tmp_path, capsys, tasks):
    (tmp_path / "file").write_text("x")
    refused(capsys, train_args(tmp_path / "file", tasks), "is a file, not a folder", tmp_path)
    refused(capsys, fed_args(tmp_path / "file", tasks), "is a file, not a folder", tmp_path)
    refused(capsys, train_args(tmp_path / "file" / "run", tasks), "file is a file, not a folder", tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)))
    refused(capsys, ["train", "--config", str(binary), "--out", str(tmp_path / "r")], "not UTF-8 text")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "target": "b"}\n{"prompt": "\xff\xfe"}\n')
    refused(capsys, train_args(tmp_path / "r", [str(bad)]), "bad.jsonl:2: not UTF-8 text")
    refused(capsys, ["eval", "--model", "tiny-llama", "--task", str(bad)], "not UTF-8 text")


def test_a_full_disk_while_saving_a_checkpoint_leaves_no_checkpoint_tmp(tmp_path, tasks):
    """No file may grow past 100 kB (RLIMIT_FSIZE): the adapter (76 kB) is written, its optimizer
    state (152 kB) is not, as on a disk that fills up while the checkpoint is written."""
    out = tmp_path / "run"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run(
        [sys.executable, "-m", "asymlora.cli", *train_args(out, tasks)],
        capture_output=True, text=True, env=ENV, preexec_fn=limit_file_size, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "File too large" in proc.stderr.strip().splitlines()[-1]
    assert (out / "adapter_init" / WEIGHTS_FILE).is_file()
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == []


# Linux capabilities by which root ignores permission bits (linux/capability.h), and prctl's
# PR_CAPBSET_DROP: dropped from the bounding set before exec, the command runs without them.
PR_CAPBSET_DROP, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER = 24, 1, 2, 3


def without_permission_override() -> None:
    """In the child, before exec: give up root's power to ignore permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_unprivileged(argv: list[str]) -> subprocess.CompletedProcess:
    """``asymlora ARGV`` in a process that permission bits stop: this user's, or, as root, root's
    without the capabilities that override them (the tests run as root here; switching to an
    unprivileged user is no option, as the interpreter lives under /root, mode 0700)."""
    drop = without_permission_override if os.geteuid() == 0 else None
    try:
        return subprocess.run(
            [sys.executable, "-m", "asymlora.cli", *argv],
            capture_output=True, text=True, env=ENV, preexec_fn=drop, timeout=300,
        )  # fmt: skip
    except subprocess.SubprocessError as err:  # the preexec_fn failed: no CAP_SETPCAP
        pytest.skip(f"cannot run a process that permission bits stop on this platform: {err}")


def read_only(folder: Path) -> Path:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="drops Linux capabilities (prctl)")
def test_a_read_only_output_folder(tmp_path, run, tasks):
    """A read-only folder under --out (a new run, a resume, an evaluation, an analysis): exit 2,
    one line naming the path with the hint, nothing written. Run in a real process that the
    permission bits stop."""
    (tmp_path / "locked").mkdir()
    locked = read_only(tmp_path / "locked")  # an empty folder no one may write to
    done = read_only(copy_of(run, tmp_path / "done"))  # a finished run, read-only
    cases = [
        train_args(locked / "run", tasks),
        train_args(done, tasks, "--resume", "--set", "train.save_every=1"),
        ["eval", "--model", "tiny-llama", "--task", tasks[0], "--limit", "2", "--out", str(locked / "e")],
        ["analyze", "change", str(done), "--out", str(locked / "a")],
    ]
    for argv in cases:
        before = {folder: snapshot(folder) for folder in (locked, done)}
        proc = run_unprivileged(argv)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr and last.startswith(f"asymlora {argv[0]}: error: "), last
        assert "Permission denied (hint: choose a folder you may write to (--out)" in last, last
        assert {folder: snapshot(folder) for folder in before} == before, argv


def test_flags_the_library_refuses(tmp_path, capsys, run, fed_run):
    refused(capsys, ["export", str(fed_run), str(tmp_path / "p"), "--client", "9"], "out of range", tmp_path)
    refused(capsys, ["generate", "--adapter", str(run), "--prompt", "x", "--max-new-tokens", "-5"],
            "max_new_tokens=-5 must be at least 1")  # fmt: skip
    refused(capsys, ["analyze", "change", str(run / "adapter")], "no adapter_init")
    other = tmp_path / "other"
    save_adapter(
        wrap(tiny_model("llama"), method="alora", num_experts=3, r=4, target_modules=["q_proj"]), other
    )
    refused(capsys, ["analyze", "similarity", str(run), str(other), "--out", str(tmp_path / "o")], "sizes")


def test_eval_and_analyze_make_no_output_folder_before_every_check(tmp_path, capsys, run, tasks):
    """Refused after the tasks, the model, the routes or the adapter are read: no --out folder
    made, no file changed (an eval into a train run's folder would overwrite its results.json)."""
    out, pair = str(tmp_path / "out"), f"{tasks[0]},{tasks[1]}"
    one = tmp_path / "one.jsonl"  # one example: no train and test split
    one.write_text(json.dumps({"prompt": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    missing = str(tmp_path / "no-such-model")
    gradients = ["analyze", "gradients", "--model", "tiny-llama", "--steps", "1", "--out", out]
    cases = [
        ([*gradients, "--tasks", pair, "--r", "100000000"], "r=100000000: above 128"),
        ([*gradients, "--tasks", pair, "--lr", "1e30"], "train.lr=1e+30 must be in (0, 1]"),
        ([*gradients, "--tasks", pair, "--model", missing], "cannot load model"),
        ([*gradients, "--tasks", f"{tasks[0]},{one}"], "cannot split 1 example(s)"),
        (["eval", "--model", "tiny-llama", "--task", str(one), "--out", out], "cannot split 1 example(s)"),
        (["eval", "--model", missing, "--task", tasks[0], "--out", out], "cannot load model"),
        (
            ["eval", "--adapter", str(run), "--task", tasks[0], "--route", "0", "--out", out],
            "does not route by",
        ),
        (
            ["eval", "--adapter", str(tmp_path / "nothing"), "--task", tasks[0], "--out", out],
            "no such folder",
        ),
        (["analyze", "similarity", str(run), str(tmp_path / "nothing"), "--out", out], "nothing"),
        (["analyze", "change", str(run), "--out", str(one / "x")], "one.jsonl is a file, not a folder"),
    ]
    for argv, says in cases:
        refused(capsys, argv, says, tmp_path)
    refused(capsys, ["eval", "--adapter", str(run), "--task", tasks[0], "--out", str(run)],
            "holds a training run (asymlora train), which asymlora eval would overwrite", run)  # fmt: skip


@pytest.mark.parametrize(
    "argv, says",
    [
        (["eval", "--adapter", "{routed}", "--task", "{task}", "--route", "9", "--out", "{out}"], "--route 9: out of range 0..1"),
        (["eval", "--adapter", "{routed}", "--task", "{task}", "--route", "x", "--out", "{out}"], "--route 'x': not a task"),
        (["eval", "--adapter", "{task}", "--task", "{task}", "--out", "{out}"], "task0.jsonl: no such folder"),
        (["eval", "--model", "tiny-llama", "--task", "{task}", "--seed", "-1", "--out", "{out}"], "split seed -1: give"),
        (["lm-eval-task", "{task}", "--seed", "-1", "--out", "{out}"], "split seed -1: give a seed >= 0"),
        (["lm-eval-task", "{one}", "--out", "{out}"], "cannot split 1 example(s) into train and test"),
        (["tasks", "--offline", "--seed", "-1"], "--seed -1: give a split seed >= 0"),
        (["export", "{routed}", "{out}", "--client", "0"], "is not a federate run (no rounds.jsonl); leave --client"),
        (["export", "{fed}", "{out}", "--task", "0"], "is a federate run (one model per client); give --client"),
        (["export", "{routed}", "{out}", "--task", "7"], "--task 7: out of range 0..1"),
        (["comm", "--model", "llama-2-7b", "--dtype", "nope"], "dtype='nope': choose one of float32"),
        (["comm", "--model", "llama-2-7b", "--rank", "5000"], "rank=5000: above 4096"),
        (["comm", "--model", "llama-2-7b", "--methods", "flora", "--ranks", "8,5000"], "ranks[1]=5000: above 4096"),
    ],
)  # fmt: skip
def test_flags_of_eval_lm_eval_task_tasks_export_and_comm(
    tmp_path, capsys, routed, fed_run, tasks, argv, says
):
    """Each refused in one line (they gave a traceback, named the wrong flag, or were accepted),
    with no output folder made."""
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    subs = {"routed": routed, "fed": fed_run, "task": tasks[0], "one": one, "out": tmp_path / "out"}
    refused(capsys, [a.format(**subs) for a in argv], says, tmp_path)


@pytest.mark.parametrize(("damage", "says"), [("alpha", "lora_alpha=1e+300 at r=4 gives the scale 2.5e+299"),
                                              ("nan", "holds NaN or infinite values")])  # fmt: skip
def test_a_damaged_peft_adapter_is_refused_at_load(tmp_path, capsys, routed, tasks, damage, says):
    peft = tmp_path / "peft"
    assert main(["export", str(routed), str(peft), "--task", "0"]) == 0
    if damage == "alpha":
        config = json.loads((peft / "adapter_config.json").read_text())
        (peft / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e300}))
    else:
        tensors = read_tensors(peft / WEIGHTS_FILE)
        tensors[sorted(tensors)[0]][0, 0] = float("nan")
        save_file(tensors, str(peft / WEIGHTS_FILE))
    refused(capsys, ["eval", "--adapter", str(peft), "--model", "tiny-llama", "--task", tasks[0]], says)


def test_export_writes_only_into_a_new_folder_or_an_earlier_export(tmp_path, capsys, routed):
    """An export into a folder of the user's (a README.md of theirs) or into the run folder itself
    would overwrite or mix files: refused, nothing touched. Into an earlier export: allowed."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my own readme")
    for folder in (mine, routed):
        refused(capsys, ["export", str(routed), str(folder), "--task", "0"], "not an asymlora export", folder)
    assert main(["export", str(routed), str(tmp_path / "peft"), "--task", "0"]) == 0
    assert main(["export", str(routed), str(tmp_path / "peft"), "--task", "1"]) == 0
    assert json.loads((tmp_path / "peft" / "asymlora_export.json").read_text())["task_id"] == 1


def test_a_folder_belongs_to_one_command(tmp_path, capsys, routed, fed_run, tasks):
    """Each command refuses an --out that holds another command's folder, touching nothing: a grid
    over a run (whose results.json it would replace), an evaluation over a run or a grid, an export
    over an adapter folder it did not write; an evaluation over an earlier one needs --overwrite."""
    peft = tmp_path / "not-exported"
    shutil.copytree(routed / "peft" / next(p.name for p in (routed / "peft").iterdir()), peft)
    (peft / "asymlora_export.json").unlink()  # a PEFT adapter of the user's, not an export of asymlora
    fed = copy_of(fed_run, tmp_path / "fed")
    grid = tmp_path / "grid"
    assert main(["compare", "--tasks", ",".join(tasks), "--methods", "lora", "--seeds", "0", *TINY,
                 "--set", "train.steps=1", "--out", str(grid)]) == 0  # fmt: skip
    evaluation = tmp_path / "evaluation"
    evaluate = ["eval", "--model", "tiny-llama", "--task", tasks[0], "--limit", "2"]
    assert main([*evaluate, "--out", str(evaluation)]) == 0
    cases = [
        (["compare", "--tasks", ",".join(tasks), "--methods", "lora", *TINY, "--out", str(routed)], routed,
         "holds a training run (asymlora train), which asymlora compare would overwrite"),
        (["federate", "--tasks", ",".join(tasks), "--methods", "fedit", *TINY, "--out", str(fed)], fed,
         "holds a federation (asymlora federate), which asymlora federate --methods would overwrite"),
        ([*evaluate, "--out", str(routed)], routed, "holds a training run"),
        ([*evaluate, "--out", str(grid)], grid, "holds a grid of runs"),
        ([*evaluate, "--out", str(evaluation)], evaluation, "holds an earlier evaluation (hint: give --overwrite"),
        (["export", str(routed), str(peft), "--task", "0"], peft, "not an asymlora export"),
        (["compare", "--tasks", ",".join(tasks), "--methods", "lora", *TINY, "--out", str(evaluation)],
         evaluation, "holds an evaluation (asymlora eval)"),
    ]  # fmt: skip
    for argv, folder, says in cases:
        refused(capsys, argv, says, folder)
    assert main([*evaluate, "--out", str(evaluation), "--overwrite"]) == 0


@pytest.mark.parametrize("command", [["eval", "--model", "tiny-llama", "--task", "x.jsonl"], ["train"], ["federate"],
                                     ["compare"], ["export", "run"], ["lm-eval-task", "x.jsonl"]])  # fmt: skip
def test_an_empty_out_is_refused(capsys, command):
    argv = [*command, ""] if command[0] == "export" else [*command, "--out", " "]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and "give a folder or file, not an empty string" in capsys.readouterr().err


def test_two_evaluations_never_write_one_folder(tmp_path, capsys, tasks):
    out = tmp_path / "e"
    with held_by_another_process(out):
        refused(
            capsys,
            ["eval", "--model", "tiny-llama", "--task", tasks[0], "--out", str(out)],
            "in use by another",
        )
    assert not out.exists()


def test_the_default_eval_folder_never_replaces_a_result(tmp_path, monkeypatch, tasks):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["eval", "--model", "tiny-llama", "--task", tasks[0], "--limit", "1"]) == 0
    made = sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir() if not p.name.startswith("."))
    assert len(made) == 2 and made[1] == made[0] + "-2"


@pytest.mark.parametrize("damage", ["results not json", "results without scores", "clients not json",
                                    "no clients.json", "export info not json"])  # fmt: skip
def test_damaged_files_of_a_run_folder(tmp_path, capsys, routed, fed_run, tasks, damage):
    run, fed = copy_of(routed, tmp_path / "run"), copy_of(fed_run, tmp_path / "fed")
    if damage == "results not json":
        (run / "results.json").write_text("{")
        argv, says = (
            ["generate", "--adapter", str(run), "--task", "0", "--prompt", "x"],
            "results.json: not valid JSON",
        )
    elif damage == "results without scores":
        (run / "results.json").write_text(json.dumps({"tasks": [{"task": 1}]}))
        argv, says = ["export", str(run), str(tmp_path / "p"), "--task", "0"], "not the results.json of a run"
    elif damage == "clients not json":
        (fed / "clients.json").write_bytes(b"\xff")
        argv, says = (
            ["export", str(fed), str(tmp_path / "p"), "--client", "0"],
            "clients.json: not valid JSON",
        )
    elif damage == "no clients.json":  # a Flower run folder has none
        (fed / "clients.json").unlink()
        argv, says = (
            ["export", str(fed), str(tmp_path / "p"), "--client", "0"],
            "no clients.json, so not a finished",
        )
    else:
        (run / "peft" / "task0" / "asymlora_export.json").write_text("{")
        argv, says = ["eval", "--adapter", str(run / "peft" / "task0"), "--task", tasks[0]], "not valid JSON"
    refused(capsys, argv, says, tmp_path)


def test_comm_refuses_a_model_config_of_too_many_blocks(tmp_path, capsys):
    """Even on the meta device each block is built as Python objects: a config.json of 10^6 layers
    would take hours and tens of GB. Refused at once."""
    from importlib import resources

    config = json.loads((resources.files("asymlora") / "resources/shapes/llama-2-7b/config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))
    start = time.monotonic()
    refused(capsys, ["comm", "--model", str(tmp_path)], "num_hidden_layers=1000000 in the model config")
    assert time.monotonic() - start < 30


def test_more_dirichlet_clients_than_examples(tmp_path, capsys, tasks):
    args = fed_args(tmp_path / "fed", tasks, "--set", "clients.partition='dirichlet'", "--set",
                    "clients.num_clients=500")  # fmt: skip
    refused(capsys, args, "cannot give 500 clients", tmp_path / "fed")


# --- 3. non-finite and out-of-range numbers ------------------------------------------------------------
@pytest.mark.parametrize(
    "setting, says",
    [
        ("train.lr=inf", "train.lr: inf is not a finite number"),
        ("train.lr=nan", "train.lr: nan is not a finite number"),
        ("train.lr=1e30", "train.lr=1e+30 must be in (0, 1]"),
        ("adapter.alpha=-inf", "adapter.alpha: -inf is not a finite number"),
        ("train.max_grad_norm=-1.0", "train.max_grad_norm=-1.0 must be >= 0"),
        ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be >= 0"),
        ("train.weight_decay=1e30", "train.weight_decay=1e+30 must be at most 10 with lr x weight_decay < 1"),
        ("train.weight_decay=5000.0", "must be at most 10"),
        ("train.max_grad_norm=1e30", "train.max_grad_norm=1e+30 must be at most 1e+06"),
        ("train.mixing_temperature=1e300", "must be in (0, 1e+06]"),
        ("adapter.alpha=1e300", "gives the scale alpha / r"),
        ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
    ],
)
def test_non_finite_and_out_of_range_config_values(tmp_path, capsys, tasks, setting, says):
    refused(capsys, train_args(tmp_path / "run", tasks, "--set", setting), says, tmp_path / "run")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["eval", "--model", "tiny-llama", "--task", "{task}", "--batch-size", "0"], "batch_size=0 must be"),
        (["eval", "--model", "tiny-llama", "--task", "{task}", "--max-length", "0"], "max_length=0 must be"),
        (["eval", "--model", "tiny-llama", "--task", "{task}", "--limit", "0"], "limit=0 must be"),
        (["comm", "--model", "llama-2-7b", "--rank", "0"], "rank=0 must be at least 1"),
        (["comm", "--model", "llama-2-7b", "--rank", "-8"], "rank=-8 must be at least 1"),
        (["comm", "--model", "llama-2-7b", "--ranks", "8,0"], "ranks[1]=0 must be at least 1"),
        (["comm", "--model", "llama-2-7b", "--dm", "0"], "d_m=0 must be at least 1"),
        (["analyze", "gradients", "--tasks", "{task},{task}", "--lr", "nan"], "--lr=nan: give a finite number"),
        (["train", "--tasks", " , "], "--tasks: expected comma-separated names"),
        (["federate", "--tasks", ","], "--tasks: expected comma-separated names"),
        (["federate", "--seeds", " , ", "--out", "{out}"], "--seeds: expected comma-separated"),
        (["compare", "--methods", ","], "--methods: expected comma-separated names"),
        (["federate", "--ranks", "8,x"], "--ranks: expected comma-separated integers, got '8,x'"),
        # shortcut values reach the config as they were typed (no text round trip: JSON's
        # escaped surrogate pair for a character outside the BMP is not TOML)
        (["federate", "--model", "tiny-llama", "--tasks", "gone-\U0001f600.jsonl", "--out", "{out}"], "gone-\U0001f600.jsonl"),
        (["train", "--model", "tiny-llama", "--tasks", "gone-\U0001f600.jsonl", "--out", "{out}"], "gone-\U0001f600.jsonl"),
    ],
)  # fmt: skip
def test_number_and_list_flags(tmp_path, capsys, tasks, argv, says, monkeypatch):
    argv = [a.format(task=tasks[0], out=tmp_path / "out") for a in argv]
    monkeypatch.chdir(tmp_path)  # commands without --out write under ./runs: it must not appear
    refused(capsys, argv, says)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content", [b"\xff\xfe{", b'{"a": NaN}', b'{"tasks": [{"task": "a"}]}', b"[1, 2]"])
def test_bad_reference_scores_for_delta_m(tmp_path, capsys, tasks, content):
    refs = tmp_path / "refs.json"
    refs.write_bytes(content)
    argv = [
        "eval",
        "--model",
        "tiny-llama",
        "--task",
        tasks[0],
        "--references",
        str(refs),
        "--out",
        str(tmp_path / "e"),
    ]
    refused(capsys, argv, "refs.json", tmp_path / "e")


def test_a_diverging_training_stops_at_the_first_non_finite_loss(tmp_path, capsys, tasks):
    out = tmp_path / "run"
    diverging = [
        "--set",
        "dtype=float16",
        "--set",
        "adapter.alpha=4000",
        "--set",
        "train.lr=1.0",
    ]  # scale 1000
    args = train_args(out, tasks, *diverging, "--set", "train.save_every=1", steps=5)
    line = refused(capsys, args, "(not finite); the step was not applied")  # float16 overflows
    step = int(line.split("error: step ")[1].split(":")[0])
    assert step >= 2 and f"keeps step {step - 1}" in line and "hint: lower train.lr or adapter.alpha" in line
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == step - 1 and not (out / "checkpoint.tmp").exists()
    assert not (out / "results.json").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():  # standard JSON only: no NaN, Infinity
        json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in metrics.jsonl"))


# --- 4. run folders ---------------------------------------------------------------------------------------
def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path, capsys, run, tasks):
    copy = copy_of(run, tmp_path / "run")
    refused(capsys, train_args(copy, tasks), "holds a run already", copy)
    refused(capsys, train_args(copy, tasks, "--resume", "--overwrite"), "not both", copy)
    refused(
        capsys, train_args(copy, tasks, "--resume", "--set", "train.lr=0.1"), "train.lr: 0.0003 -> 0.1", copy
    )
    refused(
        capsys, train_args(copy, tasks, "--resume", "--set", "adapter.seed=7"), "adapter.seed: 0 -> 7", copy
    )
    refused(
        capsys, train_args(copy, tasks, "--resume", "--set", "adapter.r=1000"), "adapter.r: 4 -> 1000", copy
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    for flag in ([], ["--overwrite"], ["--resume"]):
        refused(
            capsys, train_args(tmp_path / "mine", tasks, *flag), "holds no asymlora run", tmp_path / "mine"
        )


def test_overwrite_starts_clean_and_resume_records_the_changes_it_may_make(tmp_path, capsys, run, tasks):
    copy = copy_of(run, tmp_path / "run")
    assert (
        main(train_args(copy, tasks, "--resume", "--set", "eval.limit=1", "--set", "train.save_every=1")) == 0
    )
    (record,) = [json.loads(line) for line in (copy / "resumes.jsonl").read_text().splitlines()]
    assert record["from"] == 2 and record["changed"] == {"eval.limit": {"from": 2, "to": 1}}
    assert "limit: 1" in (copy / "config.yaml").read_text()

    assert main(train_args(copy, tasks, "--overwrite", "--set", "adapter.seed=3")) == 0
    assert not (copy / "resumes.jsonl").exists()
    fresh = tmp_path / "fresh"
    assert main(train_args(fresh, tasks, "--set", "adapter.seed=3")) == 0
    for name in ("adapter_init", "adapter"):  # the old adapter_init is gone with the old run
        got, want = read_tensors(copy / name / WEIGHTS_FILE), read_tensors(fresh / name / WEIGHTS_FILE)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.parametrize("command", ["train", "federate"])
def test_a_folder_in_use_by_another_process_is_refused(tmp_path, capsys, tasks, command):
    out = tmp_path / "run"
    out.mkdir()
    with open(tmp_path / ".run.lock", "w") as held:  # what another process's lock looks like
        fcntl.flock(held, fcntl.LOCK_EX)
        args = train_args(out, tasks) if command == "train" else fed_args(out, tasks)
        refused(capsys, args, "in use by another asymlora process", out)


def test_resume_repairs_a_metrics_line_cut_short_by_a_crash(tmp_path, run, tasks):
    copy = copy_of(run, tmp_path / "run")
    metrics = copy / "metrics.jsonl"
    (copy / "results.json").unlink()
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[1][:9])  # a kill mid-write of a line
    assert main(train_args(copy, tasks, "--resume", "--set", "train.save_every=1")) == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_saved_files_get_the_users_umask(tmp_path, tasks):
    old = os.umask(0o027)
    try:
        assert main(train_args(tmp_path / "run", tasks)) == 0
    finally:
        os.umask(old)
    for path in ["adapter/" + WEIGHTS_FILE, "adapter_init/" + CONFIG_FILE, "config.yaml",
                 "checkpoint/" + WEIGHTS_FILE, "checkpoint/optimizer.safetensors", "checkpoint/trainer_state.json",
                 "metrics.jsonl", "results.json"]:  # fmt: skip
        assert (tmp_path / "run" / path).stat().st_mode & 0o777 == 0o640, path


def test_federation_files_get_the_users_umask(fed_run):
    mask = os.umask(0o022)
    os.umask(mask)
    files = [
        fed_run / "server.safetensors",
        *fed_run.glob("checkpoint/**/*.safetensors"),
        *fed_run.glob("adapters/*/*"),
    ]
    assert len(files) > 4
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_a_refused_resume_leaves_config_yaml_as_it_was(tmp_path, capsys, fed_run, tasks):
    copy = copy_of(fed_run, tmp_path / "fed")
    refused(capsys, fed_args(copy, tasks, "--resume", "--set", "train.lr=0.5"), "train.lr", copy)
    refused(capsys, fed_args(copy, tasks), "holds a run already", copy)
    assert main(fed_args(copy, tasks, "--resume", "--rounds", "2")) == 0  # more rounds: allowed
    rounds = [json.loads(line)["round"] for line in (copy / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2] and "federation.rounds" in (copy / "resumes.jsonl").read_text()


# --- 5. task names that collide ---------------------------------------------------------------------------
def test_two_task_files_with_one_name_get_names_of_their_own(tmp_path, capsys):
    files = []
    for folder, answer in (("a", 0), ("b", 1)):
        rows = [{"prompt": f"{folder} q{j}:", "choices": ["yes", "no"], "answer": answer} for j in range(8)]
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(str(tmp_path / folder / "t.jsonl"))
    out = tmp_path / "run"
    task_routing = ["--set", "adapter.router='task'", "--set", "adapter.num_experts=2"]
    assert main(train_args(out, files, *task_routing)) == 0
    results = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["t-0", "t-1"]
    assert sorted(p.name for p in (out / "peft").iterdir()) == ["t-0", "t-1"]
    refused(
        capsys, ["generate", "--adapter", str(out), "--task", "t", "--prompt", "x"], "choose one of t-0, t-1"
    )
    assert (
        main(
            [
                "eval",
                "--model",
                "tiny-llama",
                "--task",
                files[0],
                "--task",
                files[1],
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )
    assert [t["task"] for t in json.loads((tmp_path / "e" / "results.json").read_text())["tasks"]] == [
        "t-0",
        "t-1",
    ]
    # the other order names them the other way round; each is still scored with its own expert
    loaded = load_for_eval(None, out)
    assert route_tasks(loaded, get_tasks(files[::-1]), None) == {"t-0": 1, "t-1": 0}
    assert route_tasks(loaded, get_tasks(files), None) == {"t-0": 0, "t-1": 1}
    other = tmp_path / "c" / "t.jsonl"
    other.parent.mkdir()
    other.write_text("".join(json.dumps({"prompt": f"c q{j}:", "choices": ["yes", "no"], "answer": 0}) + "\n"
                             for j in range(8)))  # fmt: skip
    eval_other = [
        "eval",
        "--adapter",
        str(out),
        "--task",
        files[0],
        "--task",
        str(other),
        "--out",
        str(tmp_path / "o"),
    ]
    refused(capsys, eval_other, "task t-1: the run's task t-1 posed other questions")
    assert not (tmp_path / "o").exists()
    assert main([*eval_other, "--route", "t-0"]) == 0  # one expert for both, as asked


@pytest.mark.parametrize("names", [["t", "t", "t-1"], ["t", "t-0", "t"], ["t-1", "t", "t", "t-2", "t"]])
def test_made_unique_names_never_collide_with_given_ones(names):
    unique = unique_names(names)
    assert len(set(unique)) == len(names)
    kept = [u == n for u, n in zip(unique, names, strict=True) if names.count(n) == 1]
    assert all(kept)  # a name given once is kept


HOSTILE_NAMES = ["..", "../x", "/etc/x", "a/b", "x\x00y", "tab\tname", ".hidden", "-flag", "x" * 101, ""]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("source", ["hf", "rg", "file"])
def test_a_task_name_is_never_a_path(tmp_path, name, source):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{j}:", "target": str(j)}) + "\n" for j in range(4)))
    if source == "file":
        with pytest.raises(InputError, match="is not allowed; a task name is 1-100 letters"):
            file_task(data, name=name) if name else Task(name, "numeric", list)
        return
    spec = f"hf:{data}?target=target&name=" if source == "hf" else "rg:gcd?size=20&name="
    with pytest.raises(InputError, match="is not allowed|a task name is"):
        get_task(spec + quote(name))


@pytest.mark.parametrize("stem", ["..", "...", " spaced out ", "tab\there", "-dash", "ü", "x" * 240])
def test_a_file_stem_becomes_a_safe_name(tmp_path, stem):
    folder = tmp_path / "d"
    folder.mkdir()
    path = folder / f"{stem}.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{j}:", "target": str(j)}) + "\n" for j in range(4)))
    task = file_task(path)
    assert task.name == check_task_name(task.name, "test") and "/" not in task.name and ".." not in task.name


# --- the error path itself ---------------------------------------------------------------------------------
def test_debug_shows_the_traceback_and_unexpected_errors_keep_theirs(tmp_path, monkeypatch, capsys, tasks):
    args = train_args(tmp_path / "run", tasks, "--set", "train.lr=inf")
    with pytest.raises(ConfigError, match="train.lr"):
        main(["--debug", *args])
    with pytest.raises(ConfigError, match="train.lr"):
        main([*args, "--debug"])
    monkeypatch.setenv("ASYMLORA_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.lr"):
        main(args)
    monkeypatch.delenv("ASYMLORA_DEBUG")

    def bug(_args):
        raise KeyError("a bug")

    commands = __import__("asymlora.cli").cli.COMMANDS
    monkeypatch.setitem(commands, "train", (commands["train"][0], bug))
    with pytest.raises(KeyError, match="a bug"):
        main(args)


# --- values that are not answers, and texts without bounds ---------------------------------------------------
@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"prompt": "q", "choices": [["a"], "b"], "answer": 0}, 'every choice must be a non-empty string or a finite number, not ["a"]'),
        ({"prompt": "q", "choices": [None, "b"], "answer": 1}, "every choice must be a non-empty string or a finite number, not null"),
        ({"prompt": "q", "choices": [True, "b"], "answer": 1}, "not true"),
        ({"prompt": "q", "choices": ["  ", "b"], "answer": 1}, 'not "  "'),
        ({"prompt": "q", "target": [None]}, "every target must be a non-empty string or a finite number, not null"),
        ({"prompt": "q", "target": "   "}, 'every target must be a non-empty string or a finite number, not "   "'),
        ({"prompt": "q", "target": [{"a": 1}]}, 'not {"a": 1}'),
        ({"prompt": "q", "target": float("nan")}, "not NaN"),
        ({"prompt": "x" * 100_001, "target": "1"}, "the input is 100,001 characters long; at most 100,000"),
        ({"prompt": "q", "target": "y" * 100_001}, "the answer is 100,001 characters long"),
    ],
)  # fmt: skip
def test_values_that_are_not_answers_and_texts_without_bounds(tmp_path, record, says):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [record, *[{"prompt": f"p{i}", "target": "1",
                    "choices": ["1", "2"], "answer": 0} for i in range(3)]]))  # fmt: skip
    with pytest.raises(DataFormatError, match=re.escape(says)):
        file_task(path).examples()


@pytest.mark.parametrize(("prompt", "says"), [("", "prompt 1 is empty"), (" \n", "prompt 1 is empty"),
                                              ("z" * 100_001, "prompt 1: the prompt is 100,001 characters")])  # fmt: skip
def test_generate_refuses_empty_and_unbounded_prompts_before_loading(capsys, prompt, says):
    refused(capsys, ["generate", "--model", "no-such-model", "--prompt", prompt], says)


# --- archives: members that leave their folder or are too large ---------------------------------------------
def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(prefix + name, data)
    else:
        with tarfile.open(path, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(prefix + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


TASK_JSON = json.dumps(
    {"examples": [{"input": f"{i}?", "target_scores": {"a": 1, "b": 0}} for i in range(4)]}
)


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
@pytest.mark.parametrize(
    ("members", "says"),
    [
        ({"t/../task.json": TASK_JSON.encode()}, "member 't/../task.json' would leave its folder"),
        ({"t/./task.json": TASK_JSON.encode()}, "would leave its folder"),
        ({"t/task.json": b" " * 5000 + TASK_JSON.encode()}, "a task file may be"),
    ],
)  # fmt: skip
def test_archive_members_that_leave_their_folder_or_are_too_large(
    tmp_path, monkeypatch, suffix, members, says
):
    monkeypatch.setattr(bigbench, "MAX_TASK_FILE_BYTES", 4096)  # the cap, small enough for a test archive
    source = write_archive(tmp_path / f"bb{suffix}", members)
    root = tmp_path / "root"
    with pytest.raises(bigbench.BigBenchUnavailableError, match=re.escape(says)):
        bigbench.extract_tasks(source, ["t"], root, subtasks=True)
    assert not root.exists() or not any(root.rglob("*.json"))  # nothing written
    ok = write_archive(tmp_path / f"ok{suffix}", {"t/task.json": TASK_JSON.encode()})
    bigbench.extract_tasks(ok, ["t"], root)
    assert (root / "t" / "task.json").read_text() == TASK_JSON


# --- threads: bounded by the cores -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [-1, cores() + 1, 100_000])
@pytest.mark.parametrize(
    "command", [["train"], ["eval", "--task", "x.jsonl"], ["federate"], ["generate", "--prompt", "hi"]]
)
def test_threads_beyond_the_cores_are_refused(capsys, command, n):
    refused(capsys, [*command, "--threads", str(n)], f"--threads {n}: give 0 (one per core) up to {cores()}")


def test_a_configs_threads_beyond_the_cores_use_the_cores(tmp_path, capsys, tasks):
    assert main(train_args(tmp_path / "run", tasks, "--set", "train.threads=100000", steps=1)) == 0
    assert (
        f"train.threads=100000, but this machine has {cores()} cores: using {cores()}"
        in capsys.readouterr().out
    )


# --- a key given twice in a config ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("c.yaml", "train:\n  lr: 0.1\n  lr: 100.0\n", "line 2: key 'lr' is given twice in one mapping"),
        ("c.yaml", "model: tiny-llama\nmodel: smollm2-135m\n", "key 'model' is given twice"),
        ("c.json", '{"train": {"steps": 1, "steps": 100000}}', "key 'steps' is given twice in one object"),
        ("c.json", '{"model": "a", "model": "b"}', "key 'model' is given twice"),
        ("c.toml", "[train]\nlr = 0.1\nlr = 100.0\n", "is not valid"),
    ],
)  # fmt: skip
def test_a_key_given_twice_in_a_config_is_refused(tmp_path, capsys, tasks, name, text, says):
    config = tmp_path / name
    config.write_text(text)
    refused(
        capsys,
        ["train", "--config", str(config), "--tasks", ",".join(tasks), "--out", str(tmp_path / "r")],
        says,
    )
    assert not (tmp_path / "r").exists()


def test_yaml_anchors_and_merge_keys_are_not_duplicates(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("base: &b {lr: 0.1, steps: 2}\ntrain:\n  <<: *b\n  steps: 3\nother: *b\n")
    assert read_file(config)["train"] == {"lr": 0.1, "steps": 3}


# --- only real statistics: seeds -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seeds", "says"),
    [("0,0", "--seeds: 0 is given twice"), ("1,2,1", "--seeds: 1 is given twice"),
     ("-1", "--seeds: -1 is out of range; give seeds from 0 to 4294967295"), (str(2**32), "is out of range")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["compare", "federate"])
def test_seeds_given_twice_or_out_of_range_are_refused_before_any_cell(
    tmp_path, capsys, tasks, command, seeds, says
):
    methods = "lora" if command == "compare" else "fedit"
    argv = [command, "--tasks" if command == "compare" else "--set", ",".join(tasks) if command == "compare"
            else f"clients.tasks={json.dumps(tasks)}", "--methods", methods, "--seeds", seeds, *TINY,
            "--out", str(tmp_path / "grid")]  # fmt: skip
    refused(capsys, argv, says)
    assert not (tmp_path / "grid").exists()


# --- work that grows with the input: linear, not quadratic -------------------------------------------------
def test_comm_is_linear_in_the_number_of_clients(capsys):
    def cpu_seconds(n: int) -> float:
        ranks = ",".join(str(r) for r in [8, 16, 32, 64] * (n // 4))
        start = time.process_time()
        assert main(["comm", "--model", "llama-2-7b", "--ranks", ranks, "--methods", "all", "--json"]) == 0
        table = json.loads(capsys.readouterr().out)
        assert len(table["methods"]["zeropad"]["params_up"]) == n
        return time.process_time() - start

    cpu_seconds(400)  # the model's shapes are read once per process
    small, large = cpu_seconds(2_000), cpu_seconds(20_000)
    assert large < 20 * small + 1.0  # quadratic work took 100 x (20,000 clients: killed after 120 s)


# --- the tracebacks of round 3, each a case of its own ------------------------------------------------------
@pytest.mark.parametrize("name", ["loop.jsonl", "loop", "gone.jsonl", "x" * 5000 + ".jsonl"])
def test_task_files_that_cannot_be_read_are_one_line(tmp_path, capsys, name):
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop2.jsonl")
    (tmp_path / "loop2.jsonl").symlink_to(tmp_path / "loop.jsonl")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    says = "no such file" if name.endswith(".jsonl") else "unknown task"
    refused(capsys, train_args(tmp_path / "run", [str(tmp_path / name)]), says, tmp_path / "run")


def test_a_one_client_fed_alora_saves_its_client_and_no_combined_adapter(tmp_path, tasks):
    out = tmp_path / "fed"
    assert main(fed_args(out, tasks[:1])) == 0
    assert (out / "adapters" / "task0").is_dir() and not (out / "alora").exists()


def test_a_5000_digit_answer_trains_and_scores(tmp_path):
    data = tmp_path / "big.jsonl"
    rows = [{"prompt": f"q{i}:", "target": "9" * 5000 if i == 0 else str(i)} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(train_args(tmp_path / "run", [str(data)], steps=1)) == 0
    scored = ["eval", "--model", "tiny-llama", "--task", str(data), "--split", "all"]
    assert main([*scored, "--out", str(tmp_path / "e")]) == 0


# --- fuzzing: the JSONL task reader and the --set parser ----------------------------------------------------
LINE = st.one_of(
    st.text(max_size=30),
    st.dictionaries(
        st.sampled_from(["prompt", "choices", "answer", "target", "instruction", "input", "output", "x"]),
        st.none() | st.booleans() | st.integers(-3, 5) | st.floats() | st.text(max_size=6)
        | st.lists(st.text(max_size=4) | st.integers(), max_size=3),
        max_size=4,
    ).map(lambda d: json.dumps(d)),
)  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True)
@given(lines=st.lists(LINE, max_size=5), raw=st.binary(max_size=40), use_raw=st.booleans())
def test_the_jsonl_reader_gives_a_task_or_one_data_format_error(tmp_path_factory, lines, raw, use_raw):
    path = tmp_path_factory.mktemp("fuzz") / "t.jsonl"
    path.write_bytes(raw if use_raw else "\n".join(lines).encode())
    try:
        task = file_task(path)
        task.examples()
    except DataFormatError as err:
        assert str(path) in str(err) or "t: example" in str(err), str(err)


SET_KEYS = st.sampled_from(
    ["train.lr", "adapter.r", "adapter", "eval.limit", "model", "a.b.c", "", ".", "x..y"]
)
SET_VALUES = st.one_of(
    st.text(max_size=12), st.sampled_from(["inf", "-inf", "nan", "1e400", "[[[[1]]]]", "{a=1}", "'x'", "1979-05-27",
                                          "true", "9" * 30, "[" * 200 + "]" * 200]),
)  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True)
@given(flags=st.lists(st.tuples(SET_KEYS, SET_VALUES).map("=".join) | st.text(max_size=12), max_size=4))
def test_the_set_parser_gives_a_config_or_one_config_error(flags):
    from asymlora.recipes.multitask import load_config

    for flag in flags:
        with contextlib.suppress(ConfigError):
            parse_override(flag)
    try:
        apply_overrides({"train": {"lr": 1.0}}, flags)
        load_config(None, flags)
    except ConfigError as err:
        assert str(err)


def test_set_values_are_read_as_toml_and_deep_nesting_is_refused():
    assert parse_override("train.lr=3e-4") == (("train", "lr"), 3e-4)
    assert parse_override("model=tiny-llama") == (("model",), "tiny-llama")
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_override("x=" + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="not a finite number"):
        from asymlora.recipes.multitask import load_config

        load_config(None, ["train.lr=nan"])


def test_a_resume_may_not_add_rounds_under_a_round_schedule(tmp_path, capsys, tasks):
    """With the lr spread over the rounds (``federation.round_schedule``), more rounds would change
    the lr of the rounds still to run: refused, naming the key; the run goes on as it was made."""
    out = tmp_path / "sched"
    args = fed_args(out, tasks, "--set", "federation.round_schedule=linear")
    assert main(args) == 0
    refused(capsys, [*args, "--resume", "--rounds", "2"], "federation.rounds", out)
    with pytest.raises(ConfigError, match="federation.round_schedule='weekly' must be one of constant"):
        fed_load_config(None, ["federation.round_schedule=weekly"])
