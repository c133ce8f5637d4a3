"""Communication accounting: counts from real dicts equal counts from shapes alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from asymlora.federated import METHODS, get_method
from asymlora.federated.comm import (
    comm_table,
    count,
    format_table,
    load_config,
    meta_model,
    per_client,
    round_counts,
    target_dims,
    to_json,
)

TINY = dict(
    vocab_size=64,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # v_proj: 24 -> 12, unlike q_proj: 24 -> 24
)
HET_RANKS = [5, 2, 3]
D_M = 4


def test_count_is_numel_times_element_size():
    tensors = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}
    assert count(tensors) == (17, 12 * 4 + 5 * 2)
    assert count({}) == (0, 0)


@pytest.fixture(scope="module")
def tiny_config_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    LlamaConfig(**TINY).save_pretrained(folder)
    return folder / "config.json"


@pytest.mark.parametrize("name", list(METHODS))
def test_shape_count_equals_a_real_round(name, tiny_config_path):
    method = get_method(name)
    dims = target_dims(meta_model(load_config(str(tiny_config_path))), ["q_proj", "v_proj"])
    assert len(dims) == 4 and dims["model.layers.0.self_attn.v_proj"] == (24, 12)
    ranks = HET_RANKS if method.heterogeneous else [3, 3, 3]
    g = torch.Generator().manual_seed(0)
    states = [
        {
            f"{mod}.{part}": torch.randn(shape, generator=g)
            for mod, (d_in, d_out) in dims.items()
            for part, shape in method.state_shapes(d_in, d_out, r, D_M).items()
        }
        for r in ranks
    ]
    server, states = method.setup(states)
    uploads = [method.upload(s) for s in states]
    _, downloads = method.aggregate(uploads, [1, 2, 3], server, [2.0] * 3)
    real = round_counts(uploads, downloads)
    shapes = per_client(method, dims, ranks, D_M)
    assert [(c["params_up"], c["params_down"]) for c in real] == shapes
    assert all(c["bytes_up"] == 4 * c["params_up"] for c in real)

    table = comm_table(str(tiny_config_path), "q_proj,v_proj", 3, ranks=HET_RANKS, d_m=D_M, methods=name)
    row = table["methods"][name]
    assert list(zip(row["params_up"], row["params_down"], strict=True)) == shapes


def test_llama2_7b_at_the_paper_settings_by_hand():
    ranks = [64, 64, 32, 32, 16, 16, 8, 8]
    table = comm_table("llama-2-7b", ["q_proj", "v_proj"], 8, ranks=ranks, d_m=16)
    rows = table["methods"]
    n_mod, d = 32 * 2, 4096  # 32 layers x (q_proj, v_proj), both 4096 -> 4096
    assert table["modules"] == n_mod and table["bytes_per_param"] == 4

    def each_way(row, up, down):
        assert row["params_up"] == up and row["params_down"] == down

    each_way(rows["fedalora"], [n_mod * d * 8] * 8, [n_mod * d * 8] * 8)  # 2,097,152 each way
    assert rows["fedalora"]["params_up"][0] == 2_097_152
    each_way(rows["fedit"], [n_mod * (d + d) * 8] * 8, [n_mod * (d + d) * 8] * 8)
    each_way(rows["ffa"], [n_mod * d * 8] * 8, [n_mod * d * 8] * 8)
    each_way(rows["fedsa"], [n_mod * d * 8] * 8, [n_mod * d * 8] * 8)
    each_way(rows["zeropad"], [n_mod * 2 * d * r for r in ranks], [n_mod * 2 * d * 64] * 8)
    each_way(rows["flexlora"], [n_mod * 2 * d * r for r in ranks], [n_mod * 2 * d * r for r in ranks])
    each_way(rows["flora"], [n_mod * 2 * d * r for r in ranks], [n_mod * 2 * d * 240] * 8)
    each_way(rows["fedalora-het"], [n_mod * r * (16 + d) for r in ranks], [n_mod * d * 16] * 8)
    fedalora_mb = 2 * n_mod * d * 8 * 4 / 1e6
    assert rows["fedalora"]["mean_total_mb"] == pytest.approx(fedalora_mb)
    assert rows["fedit"]["mean_total_mb"] == pytest.approx(2 * fedalora_mb)

    text = format_table(table)
    assert "| fedalora | 8 | 2,097,152 | 2,097,152 |" in text
    assert json.loads(to_json(table))["methods"]["fedit"]["params_up"][0] == n_mod * 2 * d * 8


def test_bundled_shapes_are_the_public_architectures():
    l2, l3, q2 = (load_config(n) for n in ("llama-2-7b", "llama-3-8b", "qwen2-7b"))
    assert (l2.hidden_size, l2.intermediate_size, l2.num_hidden_layers, l2.vocab_size) == (
        4096,
        11008,
        32,
        32000,
    )
    assert (l3.num_key_value_heads, l3.intermediate_size, l3.vocab_size) == (8, 14336, 128256)
    assert (q2.hidden_size, q2.num_hidden_layers, q2.num_key_value_heads, q2.vocab_size) == (
        3584,
        28,
        4,
        152064,
    )


def test_bf16_halves_the_bytes(tiny_config_path):
    f32 = comm_table(str(tiny_config_path), ["q_proj"], 2, methods=["fedalora"])
    bf16 = comm_table(str(tiny_config_path), ["q_proj"], 2, methods=["fedalora"], dtype="bf16")
    assert bf16["methods"]["fedalora"]["mean_bytes_up"] * 2 == f32["methods"]["fedalora"]["mean_bytes_up"]
