"""Base dtype, adapter dtype and activation checkpointing, on the tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from asymlora import wrap
from asymlora.adapters import AdapterConfig
from asymlora.models import load_model
from asymlora.train import Example, TrainConfig, encode_tasks, local_train, pad_id_of
from asymlora.train.activations import is_checkpointing, set_activation_checkpointing
from tiny_models import TARGETS, batch, tiny_model


def adapted(arch: str, dropout: float = 0.1):
    cfg = dict(method="alora", num_experts=3, router="softmax", r=4, dropout=dropout)
    model = wrap(tiny_model(arch), target_modules=TARGETS[arch], **cfg).train()
    for layer in model.adapted.values():  # a trained B, so that every A gets gradient too
        torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(3))
    return model


def loss_and_grads(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(7)  # the same dropout masks in both runs
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of every tensor autograd keeps for the backward pass of one training forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less(arch):
    model, ids = adapted(arch), batch(n=4, length=24)
    loss_off, grads_off = loss_and_grads(model, ids)
    kept_off = saved_bytes(model, ids)
    set_activation_checkpointing(model, True)
    loss_on, grads_on = loss_and_grads(model, ids)
    kept_on = saved_bytes(model, ids)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    for name in grads_off:
        assert grads_off[name].abs().sum() > 0, name  # every adapter, first block included, gets gradient
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-7)
    assert kept_on < 0.7 * kept_off
    set_activation_checkpointing(model, False)
    assert saved_bytes(model, ids) == kept_off


def test_the_training_loop_switch_trains_to_the_same_adapter():
    def run(checkpointing: bool):
        model, tokenizer = load_model("tiny-llama")
        model = wrap(model, method="alora", num_experts=2, router="task", r=4, dropout=0.1)
        examples = [[Example(f"Q{i}: {t}?", f" A{i}", t) for i in range(4)] for t in range(2)]
        cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, activation_checkpointing=checkpointing)
        history = local_train(model, encode_tasks(tokenizer, examples, 32), cfg, 0, pad_id_of(tokenizer))
        return history, model.adapter_state_dict(), is_checkpointing(model)

    history_off, state_off, flag_off = run(False)
    history_on, state_on, flag_on = run(True)
    assert (flag_off, flag_on) == (False, True)
    assert [h["loss"] for h in history_on] == pytest.approx([h["loss"] for h in history_off], rel=1e-6)
    for key in state_off:
        torch.testing.assert_close(state_on[key], state_off[key], rtol=1e-5, atol=1e-7)


def test_a_rewrapped_base_replays_the_new_wrappers_task_ids():
    base, ids = tiny_model("llama"), batch(n=2, length=10)
    first = wrap(base, method="alora", num_experts=2, router="task", r=4).train()
    set_activation_checkpointing(first, True)
    second = wrap(first.unload(), method="alora", num_experts=2, router="task", r=4).train()
    set_activation_checkpointing(second, True)
    second(input_ids=ids, labels=ids, task_ids=[0, 1]).loss.backward()  # the recompute needs task ids
    assert all(p.grad is not None for p in second.parameters() if p.requires_grad)


def test_a_model_without_checkpointing_support_is_refused_by_setting_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="set train.activation_checkpointing=false"):
        set_activation_checkpointing(model, True)
    set_activation_checkpointing(model, False)  # nothing to turn off: fine


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_base_dtype_setting_and_float32_adapters_over_it(name):
    base, _ = load_model("tiny-llama", dtype=name)
    assert {p.dtype for p in base.parameters()} == {getattr(torch, name)}
    model = wrap(base, method="alora", num_experts=2, router="softmax", r=4).train()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = batch(n=2, length=12)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_adapter_in_the_base_dtype():
    base, _ = load_model("tiny-llama", dtype="bfloat16")
    model = wrap(base, method="lora", r=4, dtype="base").train()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = batch(n=2, length=12)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


def test_auto_keeps_what_transformers_loads_and_bad_names_are_refused():
    assert next(load_model("tiny-llama", dtype="auto")[0].parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype='half' must be one of auto, bfloat16, float16, float32"):
        load_model("tiny-llama", dtype="half")
    with pytest.raises(ValueError, match="adapter config: dtype='bfloat16' must be one of float32, base"):
        AdapterConfig(dtype="bfloat16")


def test_dtype_and_device_settings_are_checked_where_they_enter():
    from asymlora.config import ConfigError
    from asymlora.recipes import federated, multitask

    with pytest.raises(ConfigError, match="dtype='half' must be one of auto, bfloat16, float16, float32"):
        federated.load_config(overrides=["dtype='half'"])
    with pytest.raises(ConfigError, match="device='tpu' must be one of auto, cpu, cuda"):
        multitask.load_config(overrides=["device='tpu'"])


@pytest.mark.parametrize("command", ["train", "federate"])
def test_a_run_logs_where_its_base_model_runs_and_in_which_dtype(command, tmp_path, capsys):
    from asymlora.cli import main
    from tiny_models import write_choice_tasks

    tasks = ",".join(write_choice_tasks(tmp_path / "tasks", n=2, size=10))
    small = ["--set", "train.steps=1", "--set", "train.batch_size=2", "--set", "eval.limit=2"]
    extra = ["--method", "fedalora", "--rounds", "1"] if command == "federate" else []
    args = [command, "--model", "tiny-llama", "--tasks", tasks, "--out", str(tmp_path / "run"), "--set",
            "dtype=bfloat16", "--set", "device=cpu", *small, *extra]  # fmt: skip
    assert main(args) == 0
    assert "model: tiny-llama on cpu, base weights bfloat16" in capsys.readouterr().out


def test_eval_and_generate_run_a_run_as_it_trained_unless_told(tmp_path, capsys):
    from asymlora.cli import main
    from tiny_models import write_choice_tasks

    tasks = write_choice_tasks(tmp_path / "tasks", n=2, size=10)
    run = str(tmp_path / "run")
    assert main(["train", "--model", "tiny-llama", "--tasks", ",".join(tasks), "--out", run, "--set", "dtype=bfloat16",
                 "--set", "train.steps=1", "--set", "train.batch_size=2", "--set", "eval.limit=2"]) == 0  # fmt: skip

    def evaluated(*flags: str) -> str:
        out = str(tmp_path / f"eval{len(flags)}")
        assert main(["eval", "--adapter", run, "--task", tasks[0], "--limit", "2", "--out", out, *flags]) == 0
        return json.loads((tmp_path / out / "results.json").read_text())["placement"]

    assert evaluated() == "cpu, base weights bfloat16"  # the run's own settings
    assert evaluated("--dtype", "float32", "--device", "cpu") == "cpu, base weights float32"
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--task", tasks[0], "--limit", "2", "--dtype", "float16",
                 "--out", str(tmp_path / "base")]) == 0  # fmt: skip
    assert "model: tiny-llama on cpu, base weights float16" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--adapter",
                run,
                "--prompt",
                "t0 q1:",
                "--max-new-tokens",
                "2",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
@pytest.mark.parametrize("command", [["eval", "--model", "tiny-llama", "--task", "x.jsonl", "--device", "cuda"],
                                     ["generate", "--adapter", "run", "--prompt", "x", "--device", "cuda"],
                                     ["train", "--model", "tiny-llama", "--tasks", "TASKS", "--set", "device=cuda"]])  # fmt: skip
def test_cuda_without_a_gpu_is_one_line_naming_the_setting(command, tmp_path, monkeypatch, capsys):
    from asymlora.cli import main
    from tiny_models import write_choice_tasks

    monkeypatch.chdir(tmp_path)
    tasks = ",".join(write_choice_tasks(tmp_path / "tasks", n=2, size=10))
    assert (
        main(
            [tasks if arg == "TASKS" else arg for arg in command] + ["--out", "out"] * (command[0] == "train")
        )
        == 2
    )
    (line,) = capsys.readouterr().err.splitlines()
    said = "device='cuda'" if command[0] == "train" else "--device cuda"
    assert line.startswith(f"asymlora {command[0]}: error: {said}: this torch") and "cannot use a GPU" in line
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    ("precision", "device", "bf16_supported", "base", "expected"),
    [
        ("auto", "cuda", True, torch.float32, True),  # a float32 base on a GPU: autocast pays
        ("auto", "cuda", True, torch.bfloat16, False),  # a bfloat16 base computes in bfloat16 already
        ("auto", "cuda", True, torch.float16, False),
        ("auto", "cuda", False, torch.float32, False),  # no bfloat16 on this GPU
        ("auto", "cpu", True, torch.float32, False),  # CPUs train in float32 unless asked
        ("bf16", "cuda", True, torch.bfloat16, True),  # asked for: always
        ("bf16", "cpu", False, torch.float32, True),
        ("fp32", "cuda", True, torch.float32, False),
    ],
)
def test_autocast_runs_under_auto_only_over_a_float32_base_on_a_bf16_gpu(
    precision, device, bf16_supported, base, expected
):
    from asymlora.train.loop import wants_autocast

    assert wants_autocast(precision, device, bf16_supported, base) is expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("adapter_dtype", ["float32", "base"])
def test_the_loop_reads_the_base_dtype_from_the_frozen_weights_not_the_adapters(dtype, adapter_dtype):
    from asymlora.models import base_weight

    model = wrap(
        load_model("tiny-llama", dtype=dtype)[0], method="alora", num_experts=2, r=4, dtype=adapter_dtype
    )
    assert base_weight(model).dtype == getattr(torch, dtype)


def test_the_training_loop_autocasts_a_float32_base_when_asked_and_a_bfloat16_base_never_under_auto():
    from asymlora.train.loop import autocast_for

    for dtype, precision, expected in [
        ("float32", "bf16", True),
        ("bfloat16", "auto", False),
        ("float32", "auto", False),
    ]:
        model = wrap(load_model("tiny-llama", dtype=dtype)[0], method="lora", r=4)
        with autocast_for(TrainConfig(precision=precision), torch.device("cpu"), model):
            assert torch.is_autocast_enabled("cpu") is expected, (dtype, precision)
