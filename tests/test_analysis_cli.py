"""`asymlora analyze gradients` on the tiny model and small task files; the pooling of snapshots."""

from __future__ import annotations

import json
import math

import pytest

from asymlora.analysis.metrics import count_conflicts
from asymlora.analysis.sharing import GradientExperiment, GradientRun, pool_snapshots, run_gradient_experiment
from asymlora.cli import main
from asymlora.data.registry import get_tasks
from tiny_models import write_choice_tasks

SMALL = ["--model", "tiny-llama", "--steps", "2", "--batch-size", "2", "--max-length", "32",
         "--examples", "4", "--r", "4", "--targets", "q_proj,v_proj"]  # fmt: skip


@pytest.fixture
def task_files(tmp_path) -> list[str]:
    return write_choice_tasks(tmp_path / "tasks", n=3, size=8)


def test_analyze_gradients_share_both_writes_what_it_measured(tmp_path, task_files, capsys):
    out = tmp_path / "grad"
    args = ["analyze", "gradients", "--tasks", ",".join(task_files), "--share", "both",
            "--measure-every", "1", "--out", str(out), *SMALL]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "gradients.json").read_text())
    assert (out / "gradients.png").read_bytes()[:4] == b"\x89PNG"
    assert report["tasks"] == ["task0", "task1", "task2"] and report["model"] == "tiny-llama"
    assert set(report["results"]) == {"a", "b"}
    for share, shared, method in (("a", "A", "hydralora"), ("b", "B", "alora")):
        res = report["results"][share]
        assert (res["shared_matrix"], res["method"], res["share"]) == (shared, method, share)
        assert res["steps_measured"] == [1, 2] and res["snapshots"] == 2
        layers = sorted({row["layer"] for row in res["modules"]})
        assert layers == list(range(len(layers))) and len(res["modules"]) == 2 * len(layers)  # q, v per layer
        for row in res["modules"]:
            assert row["pairs"] == 2 * 3  # 2 snapshots x 3 task pairs
            # pooled conflicts are the negative cosines of the snapshots, counted again here
            snaps = [
                next(m for m in res["by_step"][s]["modules"] if m["module"] == row["module"])
                for s in ("1", "2")
            ]
            assert row["conflicts"] == sum(count_conflicts(m["cosines"]) for m in snaps)
            assert all(len(m["cosines"]) == 3 for m in snaps)
            for key in ("grad_norm_A", "grad_norm_B"):
                assert len(row[key]) == 3 and all(math.isfinite(v) and v >= 0 for v in row[key])
                assert row[key][0] == pytest.approx((snaps[0][key][0] + snaps[1][key][0]) / 2)
            assert all(v > 0 for v in row["grad_norm_B"])  # A != 0: every B has a gradient
            # a task's A has a gradient once the B it reads through is non-zero: the shared B is
            # after one step; a task's own B (share a) only once that task has been sampled
            assert all(v > 0 for v in row["grad_norm_A"]) if share == "b" else any(row["grad_norm_A"])
        assert res["total_conflicts"] == sum(r["conflicts"] for r in res["modules"])
        assert res["total_pairs"] == len(res["modules"]) * 6
        assert [x["layer"] for x in res["layers"]] == layers
        assert all(x["pairs"] == 2 * 6 for x in res["layers"])
        assert res["mean_grad_norm_shared"] == pytest.approx(res[f"mean_grad_norm_{shared}"])
        assert (out / f"train_{share}" / "metrics.jsonl").read_text().count("\n") == 2
    printed = capsys.readouterr().out
    assert "shared A (hydralora)" in printed and "shared B (alora)" in printed


def test_analyze_gradients_one_share_and_user_errors(tmp_path, task_files, capsys):
    out = tmp_path / "b"
    assert main(["analyze", "gradients", "--tasks", ",".join(task_files[:2]), "--share", "b",
                 "--out", str(out), *SMALL]) == 0  # fmt: skip
    report = json.loads((out / "gradients.json").read_text())
    assert list(report["results"]) == ["b"] and report["results"]["b"]["steps_measured"] == [2]
    assert report["results"]["b"]["total_pairs"] == len(report["results"]["b"]["modules"])  # 1 pair each
    capsys.readouterr()

    def error(argv: list[str]) -> str:
        assert main(["analyze", "gradients", *SMALL, *argv, "--out", str(tmp_path / "x")]) == 2
        return capsys.readouterr().err

    assert "at least 2 different tasks" in error(["--tasks", task_files[0]])
    assert "is given twice" in error(["--tasks", f"{task_files[0]},{task_files[0]}"])
    assert "unknown task 'no_such_task'" in error(["--tasks", f"{task_files[0]},no_such_task"])
    assert "not in suite commonsense" in error(["--suite", "commonsense", "--tasks", "social_iqa,gsm8k"])
    assert "give --suite, --tasks" in error([])
    assert "steps=0 must be >= 1" in error(["--tasks", ",".join(task_files[:2]), "--steps", "0"])
    with pytest.raises(SystemExit) as exit_info:  # argparse: a share that is not a, b or both
        main(["analyze", "gradients", "--tasks", ",".join(task_files[:2]), "--share", "c"])
    assert exit_info.value.code == 2 and "invalid choice: 'c'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "nothing written on a user error"


def test_measure_steps_and_pooling_of_constructed_snapshots():
    assert GradientExperiment(steps=10, measure_every=4).measure_steps() == [4, 8, 10]
    assert GradientExperiment(steps=10).measure_steps() == [10]

    def snap(cos: float, norm: float) -> dict:
        row = {"module": "m.layers.0.q", "layer": 0, "grad_norm_A": [norm, 1.0], "grad_norm_B": [2.0, 2.0],
               "cosines": [[0, 1, cos]], "conflicts": int(cos < 0), "pairs": 1}  # fmt: skip
        return {"share": "b", "shared_matrix": "B", "method": "alora", "tasks": [0, 1], "modules": [row]}

    pooled = pool_snapshots([snap(-0.5, 1.0), snap(0.2, 3.0), snap(-0.1, 2.0)])
    row = pooled["modules"][0]
    assert row["conflicts"] == 2 and row["pairs"] == 3  # a constructed conflicting pair is counted
    assert row["grad_norm_A"] == [2.0, 1.0] and row["mean_grad_norm_A"] == 1.5
    assert pooled["layers"] == [{"layer": 0, "conflicts": 2, "pairs": 3}]
    assert pooled["mean_grad_norm_shared"] == 2.0 and pooled["snapshots"] == 3
    with pytest.raises(ValueError, match="no snapshots"):
        pool_snapshots([])


def test_both_shares_on_one_base_measure_what_each_share_measures_alone(tmp_path, task_files):
    """``analyze gradients --share both`` trains share a, then share b, on one loaded base (the
    adapters removed in between): share b's measurements equal those of a run of share b alone
    on a freshly loaded base."""
    tasks = get_tasks(task_files)
    exp = GradientExperiment(model="tiny-llama", steps=2, batch_size=2, max_length=32, examples=4, r=4,
                             target_modules=["q_proj", "v_proj"], measure_every=1)  # fmt: skip
    both = GradientRun.prepare(tasks, ["a", "b"], exp)
    results = {share: both.run(share, tmp_path / f"both_{share}", log=lambda _: None) for share in "ab"}
    alone = run_gradient_experiment(tasks, "b", exp, tmp_path / "alone", log=lambda _: None)
    assert results["b"]["by_step"] == alone["by_step"] and results["a"]["by_step"] != alone["by_step"]
