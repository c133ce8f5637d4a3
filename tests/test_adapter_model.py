"""Injection, persistence and export on real (tiny, random-init) transformers models."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from asymlora import AdapterConfig, export_peft, load_adapter, save_adapter, wrap
from asymlora.adapters import MultiLoraLinear
from asymlora.adapters.io import CONFIG_FILE
from asymlora.errors import InputError
from tiny_models import TARGETS, batch, randomize_adapters, tiny_model

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_wrap_starts_equal_to_base_freezes_it_and_unloads(arch):
    base = tiny_model(arch)
    ids = batch()
    before = logits(base, ids)
    wrapped = wrap(base, method="alora", num_experts=3, r=4, target_modules=TARGETS[arch])
    assert wrapped.adapted, "some modules were wrapped"
    torch.testing.assert_close(logits(wrapped, ids), before, rtol=0, atol=0)  # B = 0 at start
    count = wrapped.trainable_parameters()
    adapter_numel = sum(p.numel() for p in wrapped.adapter_state_dict().values())
    assert count.trainable == adapter_numel and 0 < count.percent < 100
    assert all(
        not p.requires_grad for n, p in wrapped.named_parameters() if ".lora_" not in n and ".router" not in n
    )
    randomize_adapters(wrapped)
    assert not torch.equal(logits(wrapped, ids), before)
    with pytest.raises(InputError, match="earlier wrap; call .unload"):
        wrap(base, method="lora", r=4, target_modules=TARGETS[arch])  # base still holds the layers
    restored = wrapped.unload()
    assert not any(isinstance(m, MultiLoraLinear) for m in restored.modules())
    torch.testing.assert_close(logits(restored, ids), before, rtol=0, atol=0)
    wrap(restored, method="lora", r=4, target_modules=TARGETS[arch]).unload()  # unloaded: wraps again


def test_trainable_count_matches_formula():
    base = tiny_model("llama")  # hidden 32: q_proj 32->32, v_proj 32->16 (2 kv heads x 8)
    w = wrap(base, method="alora", num_experts=3, r=4, target_modules=["q_proj", "v_proj"])
    per_layer = (3 * 4 * 32 + 4 * 32 + 3 * 32) + (3 * 4 * 32 + 4 * 16 + 3 * 32)  # K r d_in + r d_out + K d_in
    assert w.trainable_parameters().trainable == 2 * per_layer


def test_gradients_reach_only_adapter_parameters():
    w = wrap(tiny_model("llama"), method="mola", num_experts=2, r=4, target_modules=["q_proj", "v_proj"])
    randomize_adapters(w)  # with B = 0 the gradient of A would be zero
    ids = batch()
    w(input_ids=ids, labels=ids).loss.backward()
    for name, p in w.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_target_regex_and_layers():
    w = wrap(tiny_model("llama"), method="lora", target_modules=r".*\.(q|k)_proj", layers=[1])
    assert sorted(w.adapted) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="no module of LlamaForCausalLM matches.*q_proj"):
        wrap(tiny_model("llama"), method="lora", target_modules=["qproj"])


def test_task_ids_route_each_example_to_its_own_adapter():
    w = wrap(
        tiny_model("llama"), method="alora", router="task", num_experts=3, r=4, target_modules=["q_proj"]
    )
    randomize_adapters(w)
    ids = batch(3)
    mixed = logits(w, ids, task_ids=torch.tensor([0, 2, 1]))
    for row, task in enumerate([0, 2, 1]):
        torch.testing.assert_close(mixed[row], logits(w, ids[row : row + 1], task_ids=task)[0])
    with w.route(2):
        torch.testing.assert_close(logits(w, ids), logits(w, ids, task_ids=[2, 2, 2]))


# --- persistence ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "method", "router"),
    [
        ("llama", "alora", "softmax"),
        ("gpt2", "hydralora", "topk"),
        ("qwen2", "mola", "task"),
        ("mistral", "lora", None),
    ],
)
def test_save_then_load_on_fresh_base_gives_identical_logits(tmp_path, arch, method, router):
    w = wrap(
        tiny_model(arch),
        method=method,
        router=router,
        num_experts=3,
        top_k=2,
        r=4,
        target_modules=TARGETS[arch],
    )
    randomize_adapters(w)
    ids = batch()
    kw = {"task_ids": torch.tensor([1, 0, 2])} if router == "task" else {}
    expected = logits(w, ids, **kw)
    save_adapter(w, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())["method"] == method
    loaded = load_adapter(tiny_model(arch), tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids, **kw), expected)


def _saved(tmp_path, arch="llama"):
    w = wrap(tiny_model(arch), method="alora", num_experts=2, r=4, target_modules=TARGETS[arch])
    randomize_adapters(w)
    return save_adapter(w, tmp_path / "adapter")


def test_adapter_for_another_architecture_is_refused(tmp_path):
    folder = _saved(tmp_path, "llama")
    with pytest.raises(ValueError, match="made for a 'llama' model, but the model given is 'gpt2'"):
        load_adapter(tiny_model("gpt2"), folder)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    gone = "model.layers.1.self_attn.v_proj.lora_B"
    del tensors[gone]
    tensors["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(8, 33)  # d_in 33 where the layer has 32
    save_file(tensors, weights)
    base = tiny_model("llama")
    with pytest.raises(ValueError) as err:
        load_adapter(base, folder)
    message = str(err.value)
    assert f"missing tensors: {gone}" in message
    assert "model.layers.0.self_attn.q_proj.lora_A has shape (8, 33), expected (8, 32)" in message
    assert not any(isinstance(m, MultiLoraLinear) for m in base.modules()), (
        "a failed load leaves the base as it was"
    )


def test_truncated_weights_and_bad_config_give_one_clear_error(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_adapter(tiny_model("llama"), folder)
    config = folder / CONFIG_FILE
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "rank": 8}))
    with pytest.raises(ValueError, match="unknown key.*rank"):
        load_adapter(tiny_model("llama"), folder)
    config.write_text(json.dumps({**data, "r": 0}))
    with pytest.raises(ValueError, match="r=0 must be an integer >= 1"):
        load_adapter(tiny_model("llama"), folder)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(tiny_model("llama"), folder)
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        load_adapter(tiny_model("llama"), tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "r",
            10**9,
            "gives lora_A 2000000000 along axis 0, but model.layers.0.self_attn.q_proj.lora_A has shape (8, 32)",
        ),
        ("num_experts", 10**6, "gives lora_A 4000000 along axis 0"),
        ("method", "hydralora", "gives lora_A 4 along axis 0"),
    ],
)
def test_config_that_disagrees_with_the_weights_is_refused_before_allocating(tmp_path, key, value, message):
    """A tampered adapter_config.json asking for a huge rank or expert count is caught by comparing it
    with the saved tensors' shapes: nothing of that size is ever allocated (it would not fit)."""
    folder = _saved(tmp_path)
    config = folder / CONFIG_FILE
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_adapter(base, folder)
    assert not any(isinstance(m, MultiLoraLinear) for m in base.modules())


# --- PEFT export and merge ------------------------------------------------------------------------
EXPORTABLE = (
    [("llama", "lora", None, None)]
    + [
        (arch, m, "task", t)
        for arch, m in [("llama", "alora"), ("gpt2", "hydralora"), ("qwen2", "mola")]
        for t in (0, 2)
    ]
    + [("gpt2", "lora", None, None)]
)


@pytest.mark.parametrize(("arch", "method", "router", "task"), EXPORTABLE)
def test_peft_export_and_merge_reproduce_the_task_logits(tmp_path, arch, method, router, task):
    w = wrap(
        tiny_model(arch),
        method=method,
        router=router,
        num_experts=3,
        r=4,
        alpha=8,
        target_modules=TARGETS[arch],
    )
    randomize_adapters(w)
    ids = batch()
    expected = logits(w, ids, **({"task_ids": task} if task is not None else {}))
    export_peft(w, tmp_path / "peft", task=task)
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "peft").eval()
    assert (logits(peft_model, ids) - expected).abs().max() <= 1e-5
    merged = w.merge_and_unload(task=task)
    assert not any(isinstance(m, MultiLoraLinear) for m in merged.modules())
    assert (logits(merged, ids) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("router", ["softmax", "topk"])
def test_learned_router_cannot_be_exported_or_merged(tmp_path, router):
    w = wrap(
        tiny_model("llama"), method="alora", router=router, num_experts=3, top_k=2, target_modules=["q_proj"]
    )
    with pytest.raises(ValueError, match=f"learned {router} router.*cannot be merged or exported"):
        export_peft(w, tmp_path / "peft", task=0)
    with pytest.raises(ValueError, match=f"learned {router} router"):
        w.merge_and_unload(task=0)
    assert not (tmp_path / "peft").exists()


def test_task_routed_export_needs_a_task(tmp_path):
    w = wrap(tiny_model("llama"), method="alora", router="task", num_experts=3, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="task must be in 0..2"):
        export_peft(w, tmp_path / "peft")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "dora"}, "method='dora' is not one of"),
        ({"method": "alora", "num_experts": 1}, "num_experts=1 must be an integer >= 2"),
        ({"router": "argmax"}, "router='argmax' must be one of"),
        ({"router": "topk", "top_k": 4, "num_experts": 3}, "top_k=4 must be an integer in"),
        ({"init_a": "same"}, "init_a='same' must be one of"),
        ({"target_modules": []}, "target_modules"),
        ({"dropout": 1.0}, "dropout=1.0 must be in"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**overrides)


def test_wrapping_an_eval_model_keeps_dropout_off_until_train():
    w = wrap(tiny_model("llama"), method="alora", num_experts=3, dropout=0.5, target_modules=["q_proj"])
    randomize_adapters(w)
    ids = batch()
    assert torch.equal(logits(w, ids), logits(w, ids))
    w.train()
    assert not torch.equal(logits(w, ids), logits(w, ids))


PLANS = [
    dict(method="lora"),
    dict(method="alora", num_experts=3, router="softmax"),
    dict(method="hydralora", num_experts=3, router="softmax"),
    dict(method="mola", num_experts=3, router="topk", top_k=2),
    dict(method="alora", num_experts=3, router="task"),
    dict(method="factored", d_m=3),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "-".join(map(str, p.values())))
def test_planned_size_is_the_count_of_the_wrapped_models_adapter(arch, plan):
    """Every number the adapter holds; all trainable except the factored layer's B_base, which
    a client holds fixed (the server's)."""
    from asymlora.adapters.model import planned_size

    config = AdapterConfig(r=3, target_modules=TARGETS[arch], **plan)
    planned = planned_size(tiny_model(arch), config)
    wrapped = wrap(tiny_model(arch), config)
    assert planned == sum(t.numel() for t in wrapped.adapter_state_dict().values())
    if plan["method"] != "factored":
        assert planned == wrapped.trainable_parameters().trainable


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matching_rank_is_the_smallest_lora_rank_with_at_least_the_others_parameters(arch):
    from asymlora.adapters.model import matching_rank

    def trainable(**kw) -> int:
        return (
            wrap(tiny_model(arch), AdapterConfig(target_modules=TARGETS[arch], **kw))
            .trainable_parameters()
            .trainable
        )

    alora = dict(method="alora", num_experts=3, router="softmax", r=4)
    rank = matching_rank(tiny_model(arch), AdapterConfig(method="lora", r=1, target_modules=TARGETS[arch]),
                         AdapterConfig(target_modules=TARGETS[arch], **alora))  # fmt: skip
    goal = trainable(**alora)
    assert trainable(method="lora", r=rank) >= goal > trainable(method="lora", r=rank - 1)
    assert rank > 4  # K = 3 A matrices and a router: more than LoRA at the same rank
