"""Adapters in and out: plain PEFT LoRA folders load (as a LoRA, or as one task's start), the native
folder has its own config name (the old one still reads), exports record their base and a model
card, and ``asymlora eval --adapter`` scores a PEFT folder, a native folder or a run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from asymlora import export_peft, load_adapter, save_adapter, wrap
from asymlora.adapters.io import CONFIG_FILE, PEFT_CONFIG_FILE
from asymlora.cli import main
from asymlora.errors import InputError
from asymlora.models import base_model_record, load_model
from tiny_models import TARGETS, batch, randomize_adapters, tiny_model

TINY = ["--model", "tiny-llama", "--steps", "3", "--set", "adapter.r=4", "--set",
        "adapter.target_modules=['q_proj','v_proj']", "--set", "eval.limit=4", "--set", "train.batch_size=4",
        "--set", "train.max_length=48", "--set", "eval.batch_size=4"]  # fmt: skip


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def peft_folder(tmp_path: Path, arch: str = "llama", **options) -> tuple[Path, torch.Tensor]:
    """A LoRA made and saved by PEFT itself (random non-zero weights), and its logits on ``batch()``."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], lora_dropout=0.0, **options)
    model = get_peft_model(tiny_model(arch), config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.eval()
    folder = tmp_path / f"peft-{arch}"
    model.save_pretrained(folder)
    return folder, logits(model, batch())


@pytest.mark.parametrize(("arch", "options"), [("llama", {}), ("gpt2", {}), ("llama", {"use_rslora": True})])
def test_a_plain_peft_lora_folder_loads_with_the_same_logits(tmp_path, arch, options) -> None:
    folder, expected = peft_folder(tmp_path, arch, **options)
    loaded = load_adapter(tiny_model(arch), folder)
    assert loaded.adapter_config.method == "lora"
    assert torch.allclose(logits(loaded, batch()), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["alora", "mola"])
def test_a_peft_lora_starts_one_task_of_a_routed_model(tmp_path, method) -> None:
    folder, expected = peft_folder(tmp_path)
    model = wrap(tiny_model("llama"), method=method, num_experts=3, router="task", r=4, alpha=16,
                 target_modules=TARGETS["llama"])  # fmt: skip
    randomize_adapters(model)
    ids = batch()
    before = {t: logits(model, ids, task_ids=torch.tensor(t)) for t in (0, 2)}
    assert load_adapter(model, folder, task=1) is model
    assert torch.allclose(logits(model, ids, task_ids=torch.tensor(1)), expected, atol=1e-5)
    if method == "mola":  # own A and B per task: the other tasks keep theirs
        assert all(torch.equal(logits(model, ids, task_ids=torch.tensor(t)), before[t]) for t in (0, 2))
    softmax = wrap(tiny_model("llama"), method="alora", num_experts=3, r=4, target_modules=TARGETS["llama"])
    with pytest.raises(ValueError, match="cannot start task 1 from a LoRA.*learned softmax router"):
        load_adapter(softmax, folder, task=1)


def test_peft_folders_that_are_not_plain_loras_are_refused(tmp_path) -> None:
    folder, _ = peft_folder(tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="DoRA is not a plain LoRA"):
        load_adapter(tiny_model("llama"), folder)


def test_native_folder_has_its_own_config_name_and_the_old_name_still_loads(tmp_path) -> None:
    model = wrap(tiny_model("llama"), method="alora", num_experts=2, r=4, target_modules=TARGETS["llama"])
    randomize_adapters(model)
    folder = save_adapter(model, tmp_path / "native")
    assert (folder / CONFIG_FILE).is_file() and not (folder / PEFT_CONFIG_FILE).exists()
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):  # PEFT no longer misreads it
        PeftModel.from_pretrained(tiny_model("llama"), folder)
    expected = logits(model, batch())
    (folder / CONFIG_FILE).rename(folder / PEFT_CONFIG_FILE)  # a folder saved before the rename
    assert torch.equal(logits(load_adapter(tiny_model("llama"), folder), batch()), expected)


def test_export_records_a_portable_base_with_provenance_and_a_model_card(tmp_path) -> None:
    base, _ = load_model("tiny-llama")
    model = wrap(base, method="mola", num_experts=2, router="task", r=4, target_modules=["q_proj"])
    scores = [{"task": "colors", "metric": "acc", "score": 75.0, "n": 4}]
    folder = export_peft(model, tmp_path / "out", task=1, card={"task": "colors", "scores": scores})
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    card = (folder / "README.md").read_text()
    assert (
        "`mola` adapter" in card
        and "task 'colors' (task id 1)" in card
        and "| colors | acc | 75.00 | 4 |" in card
    )
    assert "random-init" in card and "\nlicense: other\n" in card  # a tiny model's license: not known
    smollm2 = base_model_record("smollm2-135m")
    assert smollm2["license"] == "apache-2.0"
    assert smollm2["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1" in smollm2["provenance"] and "dequantised" in smollm2["provenance"]


def test_an_export_names_a_base_that_loads_from_anywhere_and_a_full_card(
    tmp_path, task_files, monkeypatch, capsys
):
    """A run on a base given as a relative folder ("base") exports its absolute path; the card gives
    the base, the data, the settings, the scores and a license field (the base's, or --license)."""
    from transformers import AutoModelForCausalLM

    work = tmp_path / "work"
    base, tokenizer = load_model("tiny-llama")
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    (work / "base" / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    monkeypatch.chdir(work)
    tiny = [arg if arg != "tiny-llama" else "base" for arg in TINY]
    assert main(["train", "--tasks", ",".join(task_files), "--out", "run", "--set", "adapter.router=task",
                 "--set", "adapter.num_experts=2", *tiny]) == 0  # fmt: skip
    folder = work / "run" / "peft" / "colors"
    recorded = json.loads((folder / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"]
    assert recorded == str((work / "base").resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded base still loads
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recorded), folder)
    card = (folder / "README.md").read_text()
    assert "\nlicense: mit\n" in card and f"`base_model_name_or_path`: `{recorded}`" in card
    assert (
        "## Training data" in card and "task_names:\n- colors\n- double\n" in card and "split_seed: 0" in card
    )
    assert "suite:" not in card  # the tasks were named: the suite setting played no part
    assert "## Training settings" in card and f"model: {recorded}" in card and "router: task" in card
    assert "steps: 3" in card and "| colors | acc |" in card

    assert (
        main(
            [
                "export",
                str(work / "run"),
                str(tmp_path / "out"),
                "--task",
                "double",
                "--license",
                "apache-2.0",
            ]
        )
        == 0
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "\nlicense: apache-2.0\n" in card and "| double |" in card and "## Training settings" in card
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                str(work / "run"),
                str(tmp_path / "out2"),
                "--task",
                "double",
                "--license",
                "my license",
            ]
        )
        == 2
    )
    (line,) = capsys.readouterr().err.splitlines()
    assert "--license 'my license'" in line and not (tmp_path / "out2").exists()


def test_peft_activated_lora_is_refused_naming_the_difference(tmp_path) -> None:
    """PEFT's aLoRA (alora_invocation_tokens) is a LoRA switched on after invocation tokens: read
    as a plain LoRA it would act on every token, so it is refused, saying it is not this ALoRA."""
    folder, _ = peft_folder(tmp_path)
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps({**config, "alora_invocation_tokens": [5, 6]}))
    with pytest.raises(InputError, match="Activated LoRA .* not asymlora's ALoRA .* plain LoRAs only"):
        load_adapter(tiny_model("llama"), folder)


@pytest.fixture
def task_files(tmp_path: Path) -> list[str]:
    colors = tmp_path / "colors.jsonl"
    rows = [{"prompt": f"Item {i} is {c}. Its color:", "choices": ["red", "green", "blue"], "answer": i % 3}
            for i, c in enumerate(["red", "green", "blue"] * 8)]  # fmt: skip
    colors.write_text("".join(json.dumps(r) + "\n" for r in rows))
    double = tmp_path / "double.jsonl"
    double.write_text(
        "".join(json.dumps({"prompt": f"Twice {i} is", "target": str(2 * i)}) + "\n" for i in range(24))
    )
    return [str(colors), str(double)]


def scores_of(results: Path) -> dict[str, float]:
    return {t["task"]: t["score"] for t in json.loads(results.read_text())["tasks"]}


def test_eval_scores_peft_native_and_run_folders_like_the_run_itself(tmp_path, task_files, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--tasks", ",".join(task_files), "--out", str(run), *TINY,
                 "--set", "adapter.router='task'", "--set", "adapter.num_experts=2"]) == 0  # fmt: skip
    trained = scores_of(run / "results.json")
    colors, double = task_files
    cases = {
        "peft": ["--adapter", str(run / "peft" / "double"), "--task", double],
        "run": ["--adapter", str(run), "--task", colors, "--task", double],
        "native": ["--adapter", str(run / "adapter"), "--route", "1", "--task", double],
        "native-in-run": ["--adapter", str(run / "adapter"), "--task", colors, "--task", double],
    }
    for name, args in cases.items():
        capsys.readouterr()
        assert (
            main(
                ["eval", *args, "--limit", "4", "--batch-size", "4", "--out", str(tmp_path / f"eval-{name}")]
            )
            == 0
        )
        got = scores_of(tmp_path / f"eval-{name}" / "results.json")
        assert got == {k: trained[k] for k in got}, name
        err = capsys.readouterr().err
        assert "of the test split" in err and "4 questions" in err
        assert ("routed to adapter task" in err) == (name != "peft")
    for name in ("run", "native-in-run"):  # an adapter folder inside its run is routed by the run's names
        assert json.loads((tmp_path / f"eval-{name}" / "results.json").read_text())["routes"] == {
            "colors": 0,
            "double": 1,
        }
    unfinished = tmp_path / "unfinished"  # a run still training: its checkpoint/, no adapter/ yet
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("adapter", "results.json"))
    out = tmp_path / "eval-checkpoint"
    assert main(["eval", "--adapter", str(unfinished / "checkpoint"), "--task", colors, "--task", double,
                 "--limit", "4", "--batch-size", "4", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["routes"] == {"colors": 0, "double": 1}
    shutil.copytree(run / "adapter", tmp_path / "moved")  # away from its run: the names are gone
    assert (
        main(["eval", "--adapter", str(tmp_path / "moved"), "--task", double, "--out", str(tmp_path / "e")])
        == 2
    )
    assert "no task named double (its tasks: ids 0..1, unnamed)" in capsys.readouterr().err


def test_eval_explains_adapter_mistakes_in_one_line(tmp_path, task_files, capsys) -> None:
    folder, _ = peft_folder(tmp_path)
    shutil.copy(folder / PEFT_CONFIG_FILE, tmp_path / "cfg.json")
    assert main(["eval", "--model", str(folder), "--task", task_files[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and f"pass it as --adapter {folder}" in err.splitlines()[-1]
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps({**config, "base_model_name_or_path": None}))
    assert main(["eval", "--adapter", str(folder), "--task", task_files[0]]) == 2
    assert "does not record its base model: give --model BASE" in capsys.readouterr().err


def test_eval_split_all_scores_every_example_and_says_so(tmp_path, task_files, capsys) -> None:
    out = tmp_path / "all"
    assert (
        main(["eval", "--model", "tiny-llama", "--task", task_files[0], "--split", "all", "--out", str(out)])
        == 0
    )
    assert json.loads((out / "results.json").read_text())["tasks"][0]["n"] == 24
    captured = capsys.readouterr()
    assert "every example of each task" in captured.err and "on 24 questions of the all split" in captured.err
    assert "scored 24 questions (all split) of 1 task(s)" in captured.out


def test_softmax_router_says_where_users_look_that_there_is_no_peft_export(
    tmp_path, task_files, capsys
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--tasks", ",".join(task_files), "--out", str(run), *TINY, "--method", "alora",
                 "--set", "adapter.num_experts=2"]) == 0  # fmt: skip
    summary = capsys.readouterr().out
    assert "no PEFT export: the alora adapter mixes its 2 experts with the learned softmax router" in summary
    assert "softmax router" in json.loads((run / "results.json").read_text())["no_peft_export"]
    assert not (run / "peft").exists()
    assert main(["export", str(run), str(tmp_path / "peft")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "softmax router (the default router)" in err and "adapter.router=task" in err
