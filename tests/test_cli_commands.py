"""The federate, export, comm and analyze commands on tiny models and small task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel

from asymlora.cli import main
from asymlora.models import load_model


@pytest.fixture
def task_files(tmp_path: Path) -> list[str]:
    paths = []
    for name, word in [("cats", "meow"), ("dogs", "woof"), ("cows", "moo")]:
        path = tmp_path / f"{name}.jsonl"
        with path.open("w") as f:
            for i in range(12):
                choices = ["meow", "woof", "moo"]  # multiple choice: scored without generation (fast)
                f.write(
                    json.dumps(
                        {"prompt": f"{name} {i} say", "choices": choices, "answer": choices.index(word)}
                    )
                    + "\n"
                )
        paths.append(str(path))
    return paths


TINY = ["--model", "tiny-llama", "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "train.max_length=32",
        "--set", "eval.limit=2", "--set", "adapter.r=4", "--set", "adapter.target_modules=['q_proj','v_proj']"]  # fmt: skip


def test_federate_then_export_a_client_as_peft(tmp_path, task_files, capsys):
    out = tmp_path / "fed"
    args = ["federate", "--method", "fedalora-het", "--tasks", ",".join(task_files), "--ranks", "4,2,2",
            "--rounds", "2", "--out", str(out), "--set", "adapter.d_m=3", *TINY]  # fmt: skip
    assert main(args) == 0
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert (out / "results.md").is_file() and (out / "plots" / "score_vs_round.png").is_file()
    assert main(["export", str(out), str(tmp_path / "peft"), "--client", "dogs"]) == 0
    peft_model = PeftModel.from_pretrained(load_model("tiny-llama")[0], tmp_path / "peft")
    assert peft_model.peft_config["default"].r == 3  # fedalora-het exports at rank d_m
    assert main(["export", str(out), str(tmp_path / "peft2")]) == 2
    assert "choose one" in capsys.readouterr().err


def test_federate_refuses_mismatched_ranks(tmp_path, task_files, capsys):
    args = [
        "federate",
        "--method",
        "fedalora",
        "--tasks",
        ",".join(task_files),
        "--ranks",
        "4,2,2",
        "--out",
        str(tmp_path / "f"),
        *TINY,
    ]
    assert main(args) == 2
    assert "needs every client at the same rank" in capsys.readouterr().err
    args = [
        "federate",
        "--method",
        "zeropad",
        "--tasks",
        ",".join(task_files),
        "--ranks",
        "4,2",
        "--out",
        str(tmp_path / "f"),
        *TINY,
    ]
    assert main(args) == 2
    assert "adapter.ranks has 2 entries but there are 3 clients" in capsys.readouterr().err


def test_comm_json_for_a_bundled_shape(capsys):
    assert (
        main(["comm", "--model", "llama-2-7b", "--rank", "8", "--methods", "fedalora,fedit", "--json"]) == 0
    )
    table = json.loads(capsys.readouterr().out)
    per_module = 4096 * 8  # fedalora: d_out r each way; q_proj and v_proj are 4096 -> 4096
    assert table["methods"]["fedalora"]["mean_params_up"] == 32 * 2 * per_module
    assert table["methods"]["fedit"]["mean_params_down"] == 32 * 2 * 2 * per_module


def test_train_then_analyze_change_and_similarity(tmp_path, task_files):
    run = tmp_path / "run"
    assert (
        main(["train", "--tasks", ",".join(task_files[:2]), "--method", "alora", "--out", str(run), *TINY])
        == 0
    )
    assert main(["analyze", "change", str(run)]) == 0
    change = json.loads((run / "change.json").read_text())
    assert change and (run / "change.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        main(
            [
                "analyze",
                "similarity",
                str(run / "adapter"),
                str(run / "adapter"),
                "--out",
                str(tmp_path / "sim"),
            ]
        )
        == 0
    )
    sim = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    phis = [p for m in sim["A"]["modules"] for p in m["phi"] if p is not None]
    assert phis and all(abs(p - 1) < 1e-5 for p in phis), "an adapter is fully similar to itself"
