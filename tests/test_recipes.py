"""The multi-task recipes end to end through the CLI, on tiny-llama and small JSONL task files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asymlora.cli import main
from asymlora.recipes.multitask import load_config

TINY = ["--set", "adapter.r=4", "--set", "adapter.target_modules=['q_proj','v_proj']", "--set", "eval.limit=4",
        "--set", "train.batch_size=4", "--set", "train.max_length=48", "--set", "eval.batch_size=4"]  # fmt: skip


@pytest.fixture
def task_files(tmp_path: Path) -> list[str]:
    colors = tmp_path / "colors.jsonl"
    with colors.open("w") as f:
        for i in range(24):
            color = ["red", "green", "blue"][i % 3]
            f.write(
                json.dumps(
                    {
                        "prompt": f"Item {i} is {color}. Its color:",
                        "choices": ["red", "green", "blue"],
                        "answer": i % 3,
                    }
                )
                + "\n"
            )
    double = tmp_path / "double.jsonl"
    with double.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Twice {i} is", "target": str(2 * i)}) + "\n")
    return [str(colors), str(double)]


def train(out: Path, tasks: list[str], *extra: str) -> int:
    return main(
        [
            "train",
            "--model",
            "tiny-llama",
            "--tasks",
            ",".join(tasks),
            "--steps",
            "3",
            "--out",
            str(out),
            *TINY,
            *extra,
        ]
    )


def test_train_writes_a_complete_run_folder_and_generate_uses_it(tmp_path, task_files, capsys):
    out = tmp_path / "run"
    assert train(out, task_files, "--set", "adapter.router='task'", "--set", "adapter.num_experts=2") == 0
    for path in ["config.yaml", "metrics.jsonl", "adapter/adapter_model.safetensors", "adapter_init/asymlora_config.json",
                 "checkpoint/optimizer.safetensors", "peft/colors/adapter_config.json", "peft/double/adapter_config.json",
                 "results.md", "loss.png", "peft/colors/README.md"]:  # fmt: skip
        assert (out / path).is_file(), path
    results = json.loads((out / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["colors", "double"]
    assert results["tasks"][0]["metric"] == "acc" and results["tasks"][0]["n"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    saved = load_config(out / "config.yaml")
    assert saved.adapter.router == "task" and saved.train.steps == 3 and saved.data.tasks == task_files

    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(out),
                "--task",
                "double",
                "--prompt",
                "Twice 3 is",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert main(["generate", "--adapter", str(out), "--task", "triple", "--prompt", "x"]) == 2
    assert "not a task of this run; choose one of colors, double" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(out), "--prompt", "x"]) == 2
    assert "routes by task" in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing(tmp_path, task_files):
    out = tmp_path / "run"
    assert train(out, task_files, "--method", "lora") == 0
    before = load_file(out / "adapter" / "adapter_model.safetensors")
    assert train(out, task_files, "--method", "lora", "--resume") == 0
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_run_counts_its_cpu_time_across_resumes(tmp_path, task_files):
    """results.json holds the CPU seconds of training (carried by the checkpoint across a resume)
    and of evaluation; a checkpoint written before runs counted it leaves training uncounted
    (None, and "not counted" in results.md), never a partial sum shown as the whole."""
    out = tmp_path / "run"
    assert train(out, task_files, "--method", "lora") == 0
    first = json.loads((out / "results.json").read_text())["cpu_seconds"]
    assert first["train"] > 0 and first["evaluation"] > 0
    assert "CPU time: train " in (out / "results.md").read_text()
    state_file = out / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["cpu_seconds"] == pytest.approx(first["train"], abs=0.5)  # saved after the last step
    state_file.write_text(json.dumps({**state, "cpu_seconds": 1000.0}))
    assert train(out, task_files, "--method", "lora", "--resume") == 0
    resumed = json.loads((out / "results.json").read_text())["cpu_seconds"]
    assert 1000.0 <= resumed["train"] < 1000.0 + first["train"]  # no step left to run: the count carried
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "cpu_seconds"}))
    assert train(out, task_files, "--method", "lora", "--resume") == 0
    assert json.loads((out / "results.json").read_text())["cpu_seconds"]["train"] is None
    assert "CPU time: train not counted, evaluation " in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("cpu", "minutes"),
    [
        ({"train": 60.0, "evaluation": 30.0}, 1.5),
        ({"train": None, "evaluation": 30.0}, None),  # a part not counted: no total
        ({"train": "x", "evaluation": 30.0}, None),
        ({"train": float("nan"), "evaluation": 30.0}, None),
        ({"train": True, "evaluation": 30.0}, None),
        ({"train": -5.0, "evaluation": 30.0}, None),
        (5, None),
        ([1, 2], None),
        (None, None),  # a results.json from before runs counted CPU time
    ],
)
def test_a_cells_cpu_time_is_read_only_when_every_part_is_a_valid_count(cpu, minutes):
    from asymlora.recipes.compare import _cpu_minutes

    got = _cpu_minutes([{"cpu_seconds": cpu}])
    assert (got["mean"] if got else None) == minutes


def test_a_bfloat16_base_with_activation_checkpointing_trains_float32_task_adapters(tmp_path, task_files):
    out = tmp_path / "run"
    settings = ["dtype='bfloat16'", "train.activation_checkpointing=true", "adapter.router='task'",
                "adapter.num_experts=2"]  # fmt: skip
    assert train(out, task_files, *[a for s in settings for a in ("--set", s)]) == 0
    saved = load_config(out / "config.yaml")
    assert saved.dtype == "bfloat16" and saved.train.activation_checkpointing
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    init = load_file(out / "adapter_init" / "adapter_model.safetensors")
    assert any(not torch.equal(adapter[k], init[k]) for k in adapter)  # it trained
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "adapter.rank=4"], "unknown key adapter.rank"),
        (["--set", "train.steps='many'"], "train.steps: expected int"),
        (["--set", "adapter.router='task'"], "adapter.router='task' needs one expert per task"),
        (["--set", "adapter.dropout=2.0"], "dropout=2.0 must be in"),
        (["--set", "dtype='half'"], "dtype='half' must be one of auto, bfloat16, float16, float32"),
    ],
)
def test_bad_config_is_refused_at_start_naming_the_key(tmp_path, task_files, capsys, extra, message):
    assert train(tmp_path / "run", task_files, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_compare_writes_table_plot_and_skips_finished_cells(tmp_path, task_files, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--steps", "2", "--out", str(out),
            "--methods", "lora,alora", "--seeds", "0,1", "--single-task-baseline", *TINY]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["methods"]) == {"lora", "alora"}
    assert set(summary["methods"]["alora"]["tasks"]) == {"colors", "double"}
    assert "delta_m" in summary["methods"]["lora"]
    table = (out / "results.md").read_text()
    assert "| lora |" in table and "| alora |" in table and "delta-m %" in table
    assert "| *base model* |" in table and "| *majority answer* |" in table
    assert table.startswith("In one line (average over tasks, points): lora - base model: ")
    assert "alora - lora: " in table.splitlines()[0]
    assert "Paired difference against lora" in table and "Share of the most frequent answer" in table
    cells = {
        m: [json.loads((out / m / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
        for m in ("lora", "alora")
    }
    for method, runs in cells.items():
        minutes = [sum(r["cpu_seconds"].values()) / 60 for r in runs]
        assert summary["methods"][method]["cpu_minutes"]["mean"] == pytest.approx(sum(minutes) / 2)
    assert "CPU time per cell (training and evaluation, one process; mean ± sd over seeds): lora " in table
    stats = summary["method_statistics"]["alora"]
    for key in ("colors", "double", "average"):
        iv = stats["intervals"][key]
        assert iv["low"] <= iv["value"] <= iv["high"]
    assert set(stats["differences"]) == {"lora", "base model", "majority answer"}
    base_colors = json.loads((out / "base" / "results.json").read_text())["tasks"][0]
    assert summary["reference_rows"]["base model"]["intervals"]["colors"]["value"] == base_colors["score"]
    # the majority answer of colors' training split is one of its three colours, on every question
    assert summary["reference_rows"]["majority answer"]["top_answer_share"]["colors"] == 100.0
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    cell = out / "alora" / "seed-1" / "results.json"
    stamp = cell.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert cell.stat().st_mtime_ns == stamp
    assert (
        capsys.readouterr().out.count("skip (finished)") == 4 + 4 + 1
    )  # 2 methods x 2 seeds + 2 tasks x 2 seeds + the base model


def test_compare_refuses_to_pair_cells_scored_on_different_questions(tmp_path, task_files, capsys):
    """A task file edited between two calls (or BIG-bench files of another revision): the finished
    cells keep the old questions, a new cell is scored on the new ones, same count. The table must
    not pair them question by question; it names two runs instead."""
    out = tmp_path / "cmp"
    grid = ["compare", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--steps", "1",
            "--out", str(out), *TINY]  # fmt: skip
    assert main([*grid, "--methods", "lora", "--seeds", "0"]) == 0
    digest = json.loads((out / "lora" / "seed-0" / "results.json").read_text())["tasks"][0]["questions"]
    assert len(digest) == 16
    colors = Path(task_files[0])
    colors.write_text(colors.read_text().replace(". Its color:", ". What color is it?"))
    capsys.readouterr()
    assert main([*grid, "--methods", "lora,alora", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "task 'colors': " in err and "were scored on different questions" in err
    assert (
        err.split("task 'colors': ")[1].split(" were ")[0] == "base model and lora, seed 0"
    )  # base: rescored
    new = json.loads((out / "alora" / "seed-0" / "results.json").read_text())["tasks"][0]
    assert new["questions"] != digest and new["n"] == 4
    assert (
        json.loads((out / "base" / "results.json").read_text())["tasks"][0]["questions"] == new["questions"]
    )
    shutil.rmtree(out / "lora")  # the fix the message gives: the cell scored on the old data runs again
    assert main([*grid, "--methods", "lora,alora", "--seeds", "0"]) == 0


CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    from asymlora.config import read_file
    from asymlora.recipes import federated

    loader = federated.load_config if "federation" in read_file(path) else load_config
    assert loader(path).output_dir.startswith("runs/")


def test_compare_runs_a_parameter_matched_lora(tmp_path, task_files):
    """``lora@alora``: LoRA at the smallest rank with at least ALoRA's trainable parameters, in its
    own cells, named so in the table."""
    out = tmp_path / "cmp"
    args = ["compare", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--steps", "1", "--out", str(out),
            "--methods", "alora,lora@alora", "--seeds", "0", *TINY]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    rank = summary["matched_ranks"]["lora@alora"]
    cell = load_config(out / "lora@alora" / "seed-0" / "config.yaml")
    assert cell.adapter.method == "lora" and cell.adapter.r == rank
    matched, alora = (summary["methods"][m]["trainable_parameters"] for m in ("lora@alora", "alora"))
    assert matched >= alora
    per_rank = matched // rank  # LoRA's count is linear in its rank
    assert matched - per_rank < alora
    assert f"lora@alora is lora at r={rank}, the smallest rank" in (out / "results.md").read_text()
    args[args.index("alora,lora@alora")] = "lora@nope"
    assert main(args) == 2


def test_compare_pairs_every_method_against_each_of_against(tmp_path, task_files, capsys):
    """``--against lora,alora``: a paired table against each, the first in the headline; a paired
    difference against B is minus B's against A on the same questions."""
    out = tmp_path / "cmp"
    args = ["compare", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--steps", "2", "--out", str(out),
            "--methods", "lora,alora,mola", "--seeds", "0", "--against", "lora,alora", *TINY]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["reference"] == "lora" and summary["also_against"] == ["alora"]
    stats = summary["method_statistics"]
    for key in ("colors", "double", "average"):
        there, back = stats["alora"]["differences"]["lora"][key], stats["lora"]["differences"]["alora"][key]
        assert there["value"] == pytest.approx(-back["value"])
    assert "alora" in stats["mola"]["differences"] and "lora" in stats["mola"]["differences"]
    table = (out / "results.md").read_text()
    assert "Paired difference against lora (points):" in table
    assert "Paired difference against alora (points):" in table
    assert "mola - lora: " in table.splitlines()[0]
    capsys.readouterr()
    args[args.index("lora,alora")] = "hydralora"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--against: hydralora is not among --methods" in err and "Traceback" not in err


def test_single_task_baseline_share_trains_each_task_for_its_share_of_the_mix(tmp_path, task_files, capsys):
    """``--single-task-baseline share``: each task's LoRA trains round(steps x p_t) steps, p_t the
    task's mixing probability (at mixing temperature 2: proportional to the square root of its
    training examples), with the warm-up cut alike (at least one step); delta-m is computed
    against those runs, and the table says so."""
    from asymlora.data.registry import get_tasks

    short = tmp_path / "short.jsonl"
    with short.open("w") as f:
        for i in range(8):
            f.write(
                json.dumps(
                    {"prompt": f"Item {i} is big. Its size:", "choices": ["big", "small"], "answer": 0}
                )
            )
            f.write("\n")
    files = [task_files[0], str(short)]
    sizes = [len(t.splits(0)["train"]) for t in get_tasks(files)]
    assert sizes[0] != sizes[1]
    out = tmp_path / "cmp"
    args = ["compare", "--model", "tiny-llama", "--tasks", ",".join(files), "--steps", "8", "--out", str(out),
            "--methods", "lora", "--seeds", "0", "--single-task-baseline", "share",
            "--set", "train.warmup_steps=4", "--set", "train.mixing_temperature=2", *TINY]  # fmt: skip
    assert main(args) == 0
    for name, n in zip(["colors", "short"], sizes, strict=True):
        steps = max(1, round(8 * math.sqrt(n) / sum(math.sqrt(m) for m in sizes)))
        cell = load_config(out / "single-task-share" / name / "seed-0" / "config.yaml")
        assert (cell.train.steps, cell.train.warmup_steps) == (steps, max(1, round(4 * steps / 8)))
        assert cell.data.tasks == [files[0] if name == "colors" else files[1]]
    summary = json.loads((out / "results.json").read_text())
    assert summary["single_task_budget"] == "share" and summary["methods"]["lora"]["delta_m"] is not None
    assert (
        "delta-m % is against single-task LoRAs: each task's LoRA trains for its share"
        in (out / "results.md").read_text()
    )
    capsys.readouterr()
    args[args.index("share")] = "half"
    assert main(args) == 2
    assert "--single-task-baseline 'half': choose same or share" in capsys.readouterr().err


def test_compare_without_out_writes_beside_what_train_writes_in_the_configs_output_dir(tmp_path, task_files):
    """No --out: the cells go to <output_dir>/compare, so a ``train`` run of the same config in
    output_dir keeps its own results.json."""
    home = tmp_path / "mine"
    args = ["compare", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--steps", "1",
            "--set", f"output_dir={home}", "--methods", "lora", "--seeds", "0", *TINY]  # fmt: skip
    assert main(args) == 0
    assert (home / "compare" / "results.json").exists()
    assert (home / "compare" / "lora" / "seed-0" / "results.json").exists()
    assert not (home / "results.json").exists()


def test_compare_leave_busy_runs_the_rest_and_leaves_the_table_to_the_last_call(tmp_path, task_files, capsys):
    """``compare --leave-busy``: a method cell another process holds is left to it at once; this
    call still runs every other cell, the single-task ones included, and writes no table; a later
    call finds them finished (none runs twice) and writes it."""
    from tests.locks import held_by_another_process

    out = tmp_path / "grid"
    grid = ["compare", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--steps", "1",
            "--methods", "lora,alora", "--seeds", "0", "--single-task-baseline", "share",
            "--out", str(out), "--leave-busy", *TINY]  # fmt: skip
    with held_by_another_process(out / "lora" / "seed-0"):  # a worker running that cell
        assert main(grid) == 0
    printed = capsys.readouterr().out
    assert f"left (another process is running it): {out / 'lora' / 'seed-0'}" in printed
    assert "no table yet" in printed and not (out / "results.json").exists()
    assert not (out / "lora" / "seed-0" / "results.json").exists()
    done = [out / "alora" / "seed-0"] + sorted((out / "single-task-share").glob("*/seed-0"))
    assert len(done) == 1 + len(task_files) and all((d / "results.json").exists() for d in done)
    assert main(grid) == 0
    printed = capsys.readouterr().out
    assert all(f"skip (finished): {d}" in printed for d in done)
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"lora", "alora"}


def test_compare_status_says_where_each_cell_stands_and_runs_nothing(tmp_path, task_files, capsys):
    """``compare --status``: finished (with its CPU time), running in another process,
    resumable from its checkpoint (step and CPU so far) or not started, the single-task cells
    too; nothing is written into the grid."""
    from tests.locks import held_by_another_process

    out = tmp_path / "grid"
    grid = ["compare", "--model", "tiny-llama", "--tasks", ",".join(task_files), "--steps", "2",
            "--methods", "lora,alora", "--out", str(out), "--set", "train.save_every=1", *TINY]  # fmt: skip
    assert main([*grid, "--seeds", "0"]) == 0
    (out / "alora" / "seed-0" / "results.json").unlink()  # as if stopped after its last checkpoint
    capsys.readouterr()

    def files() -> list[Path]:  # but the lock files beside the folders (the other process's)
        return sorted(p.relative_to(out) for p in out.rglob("*") if not p.name.endswith(".lock"))

    before = files()
    with held_by_another_process(out / "lora" / "seed-1"):
        assert main([*grid, "--seeds", "0,1", "--single-task-baseline", "share", "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    state = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ")}
    assert state["lora/seed-0"].startswith("finished, ") and state["lora/seed-0"].endswith(" CPU-hours")
    assert state["lora/seed-1"] == "running"
    assert state["alora/seed-0"].startswith("resumable (checkpoint at step 2 of 2, ")
    assert state["alora/seed-1"] == "not started"
    singles = [k for k in state if k.startswith("single-task-share/")]
    assert len(singles) == 2 * len(task_files) and all(state[k] == "not started" for k in singles)
    assert (
        lines[-1]
        == f"1 finished, 1 running, 1 resumable, {1 + len(singles)} not started (of {len(state)} cells)"
    )
    assert files() == before, "--status writes nothing"


def test_compare_leaves_a_cell_another_process_runs_for_last(tmp_path, task_files):
    """Two workers on one grid share it: a cell whose folder another process holds is left until
    the other cells are done, then waited for (not queued behind at its turn)."""
    import threading
    import time

    from asymlora.recipes.compare import compare
    from asymlora.runfolder import folder_lock

    out = tmp_path / "grid"
    cfg = load_config(
        None,
        ["model=tiny-llama", f"data.tasks={task_files}", "train.steps=1", *TINY[1::2]],
    )
    held, release = threading.Event(), threading.Event()

    def other_worker() -> None:
        with folder_lock(out / "lora" / "seed-0", log=lambda _: None):
            held.set()
            release.wait(120)

    holder = threading.Thread(target=other_worker)
    holder.start()
    held.wait(30)
    lines: list[str] = []
    worker = threading.Thread(
        target=compare, args=(cfg, ["lora", "alora"], [0], out), kwargs={"log": lines.append}
    )
    worker.start()
    deadline = time.monotonic() + 150
    while not (out / "alora" / "seed-0" / "results.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "alora" / "seed-0" / "results.json").exists(), lines
    assert not (out / "lora" / "seed-0" / "results.json").exists()
    assert any(line.startswith("later (another process is running it)") for line in lines)
    release.set()
    holder.join()
    worker.join(300)
    assert (out / "lora" / "seed-0" / "results.json").exists()
    assert set(json.loads((out / "results.json").read_text())["methods"]) >= {"lora", "alora"}
