"""Router observability on tiny-llama: the gate usage and entropy that training logs equal a slow
reference computed from the routers' weights on the same batch; the balance loss's value and
gradient equal a hand-written reference; balance_loss=0 trains bit for bit as without it;
``asymlora analyze router`` flags a router set to collapse and not a uniform one; bad
``adapter.balance_loss`` values are one-line errors."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from asymlora import save_adapter, wrap
from asymlora.adapters.gates import balance_kl
from asymlora.cli import main
from asymlora.recipes.multitask import load_run
from asymlora.recipes.router_report import run_prompts
from asymlora.train import Example, TrainConfig, train
from asymlora.train.batches import collate
from asymlora.train.loop import _accumulate, encode_tasks, local_train, make_mixer
from asymlora.train.processes import ALONE
from tiny_models import randomize_adapters, scalars, tiny_model, tiny_tokenizer, write_choice_tasks

TASKS = [
    [Example(f"Q: {a}+{a}=", str(2 * a), 0) for a in range(12)],
    [Example(f"Say {w}:", w.upper(), 1) for w in ("cat", "dog", "sun", "map", "owl", "pen")],
]


def alora(balance_loss: float = 0.0, dtype=torch.float32):
    """A tiny ALoRA (K = 3, softmax router, no dropout) with random weights, B included."""
    model = wrap(tiny_model("llama").to(dtype), method="alora", num_experts=3, r=4, dropout=0.0,
                 target_modules=["q_proj", "v_proj"], balance_loss=balance_loss)  # fmt: skip
    randomize_adapters(model, scale=0.5)
    return model


@contextmanager
def module_inputs(model) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, the input x (batch, seq, d_in) of every call of each adapted module."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in model.adapted}
    hooks = [layer.register_forward_pre_hook(lambda _, args, name=name: inputs[name].append(args[0]))
             for name, layer in model.adapted.items()]  # fmt: skip
    try:
        yield inputs
    finally:
        for hook in hooks:
            hook.remove()


def run_alone(model, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Each module's inputs (tokens, d_in) over ``sequences``, each run alone (no padding)."""
    with module_inputs(model) as inputs:
        for ids in sequences:
            model(input_ids=torch.tensor([ids]))
    return {name: torch.cat([x[0] for x in xs]) for name, xs in inputs.items()}


def reference_gates(model, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Each module's softmax(x W^T) for every token of ``sequences``, from the inputs x its layer
    receives and its router's weights W, in float64."""
    return {
        name: (x.double() @ model.adapted[name].router.double().T).softmax(-1)
        for name, x in run_alone(model, sequences).items()
    }


def test_the_logged_gate_usage_and_entropy_equal_a_slow_reference(tmp_path) -> None:
    tok, cfg = tiny_tokenizer(), TrainConfig(steps=2, batch_size=4, max_length=32, log_every=2, seed=1)
    train(alora(), tok, TASKS, cfg, tmp_path)
    (logged,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged["step"] == 2 and "balance_kl" not in logged

    # the record covers steps 1 and 2: each step's batch as train draws it, on the weights it saw
    encoded = encode_tasks(tok, TASKS, cfg.max_length)
    mixer, gates = make_mixer(encoded, cfg), []
    for step in (0, 1):
        seen_by = alora()
        if step:  # after step 1 (the same batches and optimizer as train's)
            local_train(seen_by, encoded, TrainConfig(steps=1, batch_size=4, max_length=32), seed=1, pad_id=0)
        with torch.no_grad():
            gates.append(reference_gates(seen_by, [encoded[t][i].input_ids for t, i in mixer.batch(step, 4)]))
    board = scalars(tmp_path / "tensorboard")
    for name, seen in logged["router"].items():
        g = torch.cat([gates[0][name], gates[1][name]])  # every token of the two steps
        assert seen["usage"] == pytest.approx(g.mean(0).tolist(), abs=1e-6)
        assert seen["entropy"] == pytest.approx(float(-(g * g.log()).sum(-1).mean()), abs=1e-6)
        assert board[f"router/usage/{name}/expert_1"] == [(2, pytest.approx(seen["usage"][1], abs=1e-6))]
        assert board[f"router/entropy/{name}"] == [(2, pytest.approx(seen["entropy"], abs=1e-6))]


def test_the_balance_loss_value_and_gradient_equal_a_hand_written_reference() -> None:
    usage = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert balance_kl(usage).tolist() == pytest.approx(
        [0.5 * math.log(1.5) + 0.5 * math.log(0.75), 0, math.log(3)]
    )

    coef, tok = 3.0, tiny_tokenizer()
    encoded = [e for task in encode_tasks(tok, TASKS, 32) for e in task]
    ((length, _),) = Counter(len(e.input_ids) for e in encoded).most_common(1)
    items = [e for e in encoded if len(e.input_ids) == length]  # one length: one micro-batch, no padding
    assert len(items) >= 3
    cfg = TrainConfig(batch_size=len(items), max_length=32)
    grads, values = [], []
    for weight in (coef, 0.0):
        model = alora(weight, torch.float64)
        loss, kl = _accumulate(model, items, cfg, ALONE, 0, torch.device("cpu"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        values.append((loss, kl))
    assert values[0][0] == values[1][0] and values[1][1] is None  # the language-model loss is the same

    model = alora(0.0, torch.float64)  # the reference: sum_k u_k log(K u_k) of each module, averaged
    batch = {
        k: v for k, v in collate(items, 0).items() if k in ("input_ids", "attention_mask", "position_ids")
    }
    with module_inputs(model) as inputs:
        model(**batch)
    kls = []
    for name, (x,) in inputs.items():
        u = (x.flatten(0, 1) @ model.adapted[name].router.T).softmax(-1).mean(0)
        kls.append(sum(u[k] * torch.log(3 * u[k]) for k in range(3)))
    reference = torch.stack(kls).mean()
    assert values[0][1] == pytest.approx(reference.item(), rel=1e-12)
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    expected = torch.autograd.grad(coef * reference, list(params.values()), allow_unused=True)
    for (name, _), want in zip(params.items(), expected, strict=True):
        got = grads[0][name] - grads[1][name]
        want = torch.zeros_like(got) if want is None else want  # a module after the last router
        # float64 but for Llama's RMSNorm, which computes in float32: ~1e-7 of the gradients
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-6), name


def test_balance_loss_zero_trains_bit_for_bit_as_without_it(tmp_path) -> None:
    tok = tiny_tokenizer()
    cfg = TrainConfig(steps=3, batch_size=4, grad_accum=2, max_length=32, seed=2)
    logged = alora()
    train(logged, tok, TASKS, cfg, tmp_path / "run")  # records the gates of every step
    plain = alora()
    local_train(plain, encode_tasks(tok, TASKS, 32), cfg, seed=2, pad_id=0)  # records nothing
    balanced = alora(0.5)
    train(balanced, tok, TASKS, cfg, tmp_path / "balanced")
    for name, value in logged.adapter_state_dict().items():
        assert torch.equal(value, plain.adapter_state_dict()[name]), name
    router = "model.layers.0.self_attn.q_proj.router"
    assert not torch.equal(logged.adapter_state_dict()[router], balanced.adapter_state_dict()[router])


def test_a_resumed_run_logs_the_router_numbers_of_a_run_that_never_stopped(tmp_path) -> None:
    tok, cfg = tiny_tokenizer(), TrainConfig(steps=6, batch_size=4, max_length=32, log_every=4, save_every=3)
    train(alora(), tok, TASKS, cfg, tmp_path / "whole")

    def stop_after_the_checkpoint(step: int, _) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(alora(), tok, TASKS, cfg, tmp_path / "cut", on_step=stop_after_the_checkpoint)
    train(alora(), tok, TASKS, cfg, tmp_path / "cut", resume=True)  # step 4's record covers steps 1-4
    whole, cut = ([json.loads(line)["router"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                  for run in ("whole", "cut"))  # fmt: skip
    assert len(whole) == 2 and whole == cut


def collapse_routers(model, prompts: list[str], tok) -> None:
    """Each router's first row along the mean input its module sees on ``prompts`` (scaled so that
    the mean input gets logit 20), the other rows zero: expert 0 takes nearly every token whose input
    leans that way."""
    with torch.no_grad():
        for name, x in run_alone(model, [tok(p)["input_ids"] for p in prompts]).items():
            mean = x.mean(0)
            router = model.adapted[name].router
            router.zero_()
            router[0] = 20 * mean / mean.dot(mean)


def test_analyze_router_flags_a_collapsed_router_and_not_a_uniform_one(tmp_path, capsys) -> None:
    tasks = write_choice_tasks(tmp_path / "data", n=2)
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--tasks", ",".join(tasks), "--steps", "1", "--out", str(run),
                 "--set", "adapter.r=4", "--set", "adapter.target_modules=['q_proj','v_proj']",
                 "--set", "eval.limit=2", "--set", "train.batch_size=4", "--set", "train.max_length=32"]) == 0  # fmt: skip
    model, tok, cfg, _ = load_run(run)
    prompts = run_prompts(cfg, 64)
    for setting in ("uniform", "collapsed"):
        with torch.no_grad():
            for layer in model.adapted.values():
                layer.router.zero_()  # every token: 1/3 each
        if setting == "collapsed":
            collapse_routers(model, prompts["train"] + prompts["test"], tok)
        save_adapter(model, run / "adapter")
        capsys.readouterr()
        assert main(["analyze", "router", str(run), "--out", str(tmp_path / setting)]) == 0
        out = capsys.readouterr().out
        report = json.loads((tmp_path / setting / "router.json").read_text())
        for split in ("train", "test"):
            seen = report["splits"][split]
            assert seen["prompts"] == len(prompts[split]) and seen["collapsed"] == (setting == "collapsed")
            verdict = "COLLAPSED" if setting == "collapsed" else "not collapsed"
            assert f"{split} ({seen['prompts']} prompts, {seen['tokens']} tokens): {verdict}:" in out
        if setting == "uniform":
            for module in report["splits"]["train"]["modules"].values():
                assert module["usage"] == pytest.approx([1 / 3] * 3) and module["entropy"] == pytest.approx(
                    math.log(3)
                )
        else:
            assert len(report["splits"]["train"]["collapsed_modules"]) > len(model.adapted) / 2


@pytest.mark.parametrize(
    "value, said",
    [("-0.1", "must be a finite number >= 0"), ("nan", "nan is not a finite number"),
     ("inf", "inf is not a finite number"), ("x", "expected float")],
)  # fmt: skip
def test_a_bad_balance_loss_is_one_line(tmp_path, capsys, value: str, said: str) -> None:
    tasks = write_choice_tasks(tmp_path / "data", n=2)
    assert main(["train", "--model", "tiny-llama", "--tasks", ",".join(tasks), "--out", str(tmp_path / "run"),
                 "--set", f"adapter.balance_loss={value}"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "balance_loss" in err[0] and said in err[0], err
    assert not (tmp_path / "run").exists()
    assert main(["train", "--model", "tiny-llama", "--tasks", ",".join(tasks), "--out", str(tmp_path / "run"),
                 "--set", "adapter.router=task", "--set", "adapter.num_experts=2",
                 "--set", "adapter.balance_loss=0.1"]) == 2  # fmt: skip
    assert "needs router softmax or topk" in capsys.readouterr().err
