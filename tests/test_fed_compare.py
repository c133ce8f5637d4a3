"""``asymlora federate --methods ... --seeds ...``: one run per (method, seed), the table's numbers
equal those of the runs it summarises, and a re-run skips finished runs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from statistics import fmean, stdev
from types import SimpleNamespace

import pytest
from tests.locks import held_by_another_process
from tests.tiny_models import write_choice_tasks

from asymlora.cli import main
from asymlora.recipes.compare import run_cell
from asymlora.runfolder import folder_lock


def federate(out: Path, tasks: list[str], *extra: str) -> int:
    return main(["federate", "--model", "tiny-llama", "--tasks", ",".join(tasks), "--out", str(out),
                 "--set", "federation.rounds=1", "--set", "train.steps=1", "--set", "train.batch_size=2",
                 "--set", "adapter.r=2", "--set", "eval.limit=2", *extra])  # fmt: skip


def test_grid_summarises_its_runs_and_skips_finished_ones(tmp_path: Path, capsys) -> None:
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=6)
    out = tmp_path / "grid"
    assert federate(out, tasks, "--methods", "fedit,fedalora", "--seeds", "0,1") == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["methods"]) == ["fedit", "fedalora"] and summary["seeds"] == [0, 1]
    for method in ("fedit", "fedalora"):
        runs = [json.loads((out / method / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["method"] == method for r in runs)
        entry = summary["methods"][method]
        averages = [r["average"] for r in runs]
        assert entry["average"]["mean"] == pytest.approx(fmean(averages))
        assert entry["average"]["sd"] == pytest.approx(stdev(averages))
        for client in summary["tasks"]:
            assert entry["tasks"][client]["mean"] == pytest.approx(fmean(r["scores"][client] for r in runs))
        up = fmean(r["bytes_up_per_client_round"] for r in runs) / 1e6
        assert entry["mb_up_per_client_round"] == pytest.approx(up) and up > 0
    # Fed-ALoRA sends B only: half of FedIT's A and B at the same rank (square q/v projections)
    methods = summary["methods"]
    assert methods["fedalora"]["mb_up_per_client_round"] < methods["fedit"]["mb_up_per_client_round"]
    table = (out / "results.md").read_text()
    assert "\n| fedit | 2 | " in table and "\n| fedalora | 2 | " in table  # the score rows, with ranks
    assert (out / "results.png").stat().st_size > 0
    capsys.readouterr()
    assert federate(out, tasks, "--methods", "fedit,fedalora", "--seeds", "0,1") == 0
    assert capsys.readouterr().out.count("skip (finished)") == 4 + 1  # 2 methods x 2 seeds + the base model
    # the same folder with another step count: refused, not reported under the new settings
    assert federate(out, tasks, "--methods", "fedit", "--seeds", "0", "--set", "train.steps=2") == 2
    assert "holds a run made with another config (train.steps: 1 -> 2)" in capsys.readouterr().err


def test_heterogeneous_grid_takes_the_ranks_for_every_method(tmp_path: Path) -> None:
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=6)
    out = tmp_path / "het"
    assert federate(out, tasks, "--ranks", "4,2", "--methods", "zeropad,fedalora-het", "--seeds", "0") == 0
    summary = json.loads((out / "results.json").read_text())
    assert {m: e["ranks"] for m, e in summary["methods"].items()} == {
        "zeropad": [4, 2],
        "fedalora-het": [4, 2],
    }


def test_grid_needs_an_output_folder_and_known_methods(tmp_path: Path) -> None:
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=6)
    assert main(["federate", "--model", "tiny-llama", "--tasks", ",".join(tasks), "--methods", "fedit"]) != 0
    assert federate(tmp_path / "g", tasks, "--methods", "fedit,nope") != 0
    assert federate(tmp_path / "g", tasks, "--methods", "fedit", "--method", "ffa") == 2
    assert federate(tmp_path / "g", tasks, "--methods", "fedit", "--against", "ffa") == 2
    assert main(["federate", "--model", "tiny-llama", "--tasks", ",".join(tasks), "--against", "fedit"]) == 2
    assert not (tmp_path / "g").exists()


def test_a_cell_another_process_is_running_is_waited_for_then_read(tmp_path: Path) -> None:
    """Two compare processes sharing an output folder: the second waits for the cell's lock, then
    reads the finished cell instead of running it again."""
    folder = tmp_path / "lora" / "seed-0"
    cfg = SimpleNamespace(output_dir=str(folder))
    runs: list[str] = []

    def runner(cfg, resume, log) -> None:
        runs.append(cfg.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text('{"score": 1}')

    logs: list = []
    with folder_lock(folder):  # this "process" holds the cell
        waiter = threading.Thread(
            target=lambda: logs.append(run_cell(cfg, logs.append, lambda c, p: None, runner))
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while not any("waiting: another process is running" in str(line) for line in logs):
            assert time.monotonic() < deadline, logs
            time.sleep(0.01)
        runner(cfg, True, None)  # ... and finishes it
    waiter.join(30)
    assert runs == [str(folder)], "the cell ran once"
    assert logs[-2:] == [f"skip (finished): {folder}", {"score": 1}]


def test_grid_table_has_intervals_paired_differences_and_reference_rows(tmp_path: Path) -> None:
    """Each client's per-question predictions travel from its run to the table: the intervals'
    points equal the runs' scores, the paired difference equals the difference of the per-question
    means, and the base-model row equals the base model scored directly on the same questions."""
    from asymlora.data.registry import get_tasks
    from asymlora.eval.runner import evaluate_task
    from asymlora.models import load_model

    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=40)
    out = tmp_path / "grid"
    assert federate(out, tasks, "--methods", "fedit,fedalora", "--seeds", "0,1", "--set", "eval.limit=4") == 0
    summary = json.loads((out / "results.json").read_text())
    for method in ("fedit", "fedalora"):  # each cell's CPU time, from its runs' results.json
        runs = [json.loads((out / method / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
        minutes = [sum(r["cpu_seconds"].values()) / 60 for r in runs]
        assert summary["methods"][method]["cpu_minutes"]["mean"] == pytest.approx(fmean(minutes))
    assert summary["reference"] == "fedit" and set(summary["reference_rows"]) == {
        "base model",
        "majority answer",
    }
    clients = summary["tasks"]
    per_question = {}
    for method in ("fedit", "fedalora"):
        runs = [json.loads((out / method / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
        for run in runs:
            for client in clients:
                (kept,) = run["client_results"][client]
                picks = [100.0 * (p["pick"] == p["answer"]) for p in kept["predictions"]]
                assert len(picks) == 4 and fmean(picks) == pytest.approx(run["scores"][client])
        per_question[method] = {
            c: [fmean(q) for q in zip(*[[100.0 * (p["pick"] == p["answer"]) for p in r["client_results"][c][0]
                                        ["predictions"]] for r in runs], strict=True)] for c in clients
        }  # fmt: skip
        stats = summary["method_statistics"][method]["intervals"]
        for client in clients:
            assert stats[client]["value"] == pytest.approx(fmean(per_question[method][client]))
            assert stats[client]["low"] <= stats[client]["value"] <= stats[client]["high"]
    diff = summary["method_statistics"]["fedalora"]["differences"]["fedit"]["average"]
    expected = fmean(fmean(per_question["fedalora"][c]) - fmean(per_question["fedit"][c]) for c in clients)
    assert diff["value"] == pytest.approx(expected) and diff["low"] <= diff["value"] <= diff["high"]
    # the base row: the base model itself on each client's first 4 test questions
    model, tokenizer = load_model("tiny-llama")
    base = summary["reference_rows"]["base model"]["intervals"]
    for client, task in zip(clients, get_tasks(tasks), strict=True):
        assert base[client]["value"] == pytest.approx(evaluate_task(model, tokenizer, task, limit=4).score)
    table = (out / "results.md").read_text()
    assert (
        table.startswith("In one line") and "| *base model* |" in table and "| *majority answer* |" in table
    )
    assert "fedalora - fedit:" in table.splitlines()[0] and "MB up + down" in table


def test_a_damaged_predictions_file_is_named_not_a_traceback(tmp_path: Path, capsys) -> None:
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=20)
    run = tmp_path / "run"
    assert federate(run, tasks) == 0
    kept = json.loads((run / "predictions.json").read_text())
    assert kept["round"] == 1 and set(kept["clients"]) == set(
        json.loads((run / "results.json").read_text())["scores"]
    )
    (run / "predictions.json").write_text("[1, 2")
    capsys.readouterr()
    assert federate(run, tasks, "--resume") == 2
    err = capsys.readouterr().err
    assert "predictions.json: not valid JSON" in err and "Traceback" not in err


def test_runs_in_different_folders_are_tabulated_paired_against_one(tmp_path: Path) -> None:
    """benchmarks/fed_runs_table.py: finished federate runs of an ablation, kept in their own
    folders, in one table; a run paired against itself differs by exactly 0, another setting's
    run gets its own row and a paired difference."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fed_runs_table import main as table

    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=6)
    first, common = tmp_path / "independent", tmp_path / "common"
    assert federate(first, tasks, "--method", "fedalora") == 0
    assert federate(common, tasks, "--method", "fedalora", "--set", "federation.client_a_init=common") == 0
    out = tmp_path / "table"
    runs = ["--run", f"independent={first}", "--run", f"again={first}", "--run", f"common={common}"]
    assert table(["--out", str(out), *runs]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["methods"]) == ["independent", "again", "common"]
    same = summary["method_statistics"]["again"]["differences"]["independent"]["average"]
    assert (same["value"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    assert "independent" in summary["method_statistics"]["common"]["differences"]
    assert "| common |" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="no finished run"):
        table(["--out", str(out), "--run", f"x={tmp_path / 'nothing'}"])


def test_leave_busy_leaves_a_cell_to_its_process_and_makes_no_table_until_all_are_done(
    tmp_path: Path, capsys
) -> None:
    """``--leave-busy`` (several workers on one grid): a cell another process holds is left to it
    at once, not waited for; this call runs the others and writes no table; the call that finds
    every cell finished writes it. Without the flag a single run refuses it, naming the flag."""
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=6)
    out = tmp_path / "grid"
    grid = ("--methods", "fedit,fedalora", "--seeds", "0", "--leave-busy")
    with held_by_another_process(out / "fedit" / "seed-0"):  # a worker running that cell
        started = time.monotonic()
        assert federate(out, tasks, *grid) == 0
        assert time.monotonic() - started < 120
    printed = capsys.readouterr().out
    assert f"left (another process is running it): {out / 'fedit' / 'seed-0'}" in printed
    assert "no table yet" in printed
    assert (out / "fedalora" / "seed-0" / "results.json").exists()
    assert not (out / "fedit" / "seed-0" / "results.json").exists()
    assert not (out / "results.json").exists()
    assert federate(out, tasks, *grid) == 0  # the lock is gone: this call runs fedit, then the table
    assert f"skip (finished): {out / 'fedalora' / 'seed-0'}" in capsys.readouterr().out
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["fedit", "fedalora"]
    assert federate(tmp_path / "one", tasks, "--leave-busy") == 2
    assert "--leave-busy is for a comparison" in capsys.readouterr().err


def test_federate_status_says_how_many_rounds_each_cell_has(tmp_path: Path, capsys) -> None:
    """``federate --methods ... --status``: a finished cell, one resumable after its last round
    (rounds and CPU so far from the checkpoint's round records), one not started; runs nothing."""
    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=6)
    out = tmp_path / "grid"
    assert federate(out, tasks, "--methods", "fedit,fedalora", "--seeds", "0") == 0
    (out / "fedalora" / "seed-0" / "results.json").unlink()  # as if stopped after its last round
    capsys.readouterr()
    assert federate(out, tasks, "--methods", "fedit,fedalora", "--seeds", "0,1", "--status") == 0
    lines = capsys.readouterr().out.splitlines()
    state = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ")}
    assert state["fedit/seed-0"].startswith("finished, ")
    assert state["fedalora/seed-0"].startswith("resumable (checkpoint at round 1 of 1, ")
    assert state["fedit/seed-1"] == state["fedalora/seed-1"] == "not started"
    assert not (out / "fedit" / "seed-1").exists()
    assert lines[-1] == "1 finished, 0 running, 1 resumable, 2 not started (of 4 cells)"
    assert federate(tmp_path / "one", tasks, "--status") == 2  # a single run has no grid
    assert "--status is for a comparison" in capsys.readouterr().err
