"""The layer against slow, written-out formulas: every shape, every router, Linear and Conv1D."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from asymlora.adapters import AdapterConfig, FactoredLoraLinear, MultiLoraLinear
from asymlora.adapters.layer import RoutingState, kaiming_uniform, module_generator

D_IN, D_OUT, R, K = 12, 10, 3, 3


def make_layer(method: str, router: str | None, top_k: int = 2, conv: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    base = Conv1D(D_OUT, D_IN) if conv else nn.Linear(D_IN, D_OUT)
    base = base.double()
    nn.init.normal_(base.weight)
    cfg = AdapterConfig(
        method=method, r=R, alpha=7.0, dropout=0.0, num_experts=K, router=router, top_k=top_k, seed=seed
    )
    layer = MultiLoraLinear(base, cfg, "blocks.0.proj", RoutingState())
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; make the update visible
    return layer


def slow_gates(layer: MultiLoraLinear, x: torch.Tensor, task: int) -> list[float]:
    """g for one token, written out."""
    if layer.router_kind is None:
        return [1.0]
    if layer.router_kind == "task":
        return [1.0 if i == task else 0.0 for i in range(K)]
    logits = [float(layer.router[i].detach() @ x) for i in range(K)]
    keep = (
        range(K)
        if layer.router_kind == "softmax"
        else sorted(range(K), key=lambda i: -logits[i])[: layer.top_k]
    )
    z = sum(math.exp(logits[i]) for i in keep)
    return [math.exp(logits[i]) / z if i in keep else 0.0 for i in range(K)]


def slow_forward(layer: MultiLoraLinear, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
    """y = W0 x + b + s * (the method's sum), token by token, expert by expert."""
    s, r = layer.scale, layer.r
    w0 = layer.base_layer.weight.T if layer.fan_in_fan_out else layer.base_layer.weight  # (d_out, d_in)
    A = [layer.lora_A[i * r : (i + 1) * r] for i in range(layer.k_a)]
    B = [layer.lora_B[:, j * r : (j + 1) * r] for j in range(layer.k_b)]
    out = torch.zeros(x.shape[0], x.shape[1], D_OUT, dtype=x.dtype)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[b, t]
            g = slow_gates(layer, v, tasks[b])
            if layer.k_a == 1 and layer.k_b == 1:  # lora
                delta = B[0] @ (A[0] @ v)
            elif layer.k_b == 1:  # alora: one B after the weighted sum of the A's
                delta = B[0] @ sum(g[i] * (A[i] @ v) for i in range(K))
            elif layer.k_a == 1:  # hydralora: one A, weighted sum of the B's
                delta = sum(g[j] * (B[j] @ (A[0] @ v)) for j in range(K))
            else:  # mola: weighted sum of the pairs
                delta = sum(g[i] * (B[i] @ (A[i] @ v)) for i in range(K))
            out[b, t] = w0 @ v + layer.base_layer.bias + s * delta
    return out


SHAPES = [("lora", None)] + [
    (m, r) for m in ("alora", "hydralora", "mola") for r in ("softmax", "topk", "task")
]


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize(("method", "router"), SHAPES)
def test_forward_matches_written_out_formula(method, router, conv):
    layer = make_layer(method, router, conv=conv)
    x = torch.randn(2, 4, D_IN, dtype=torch.float64)
    tasks = [2, 0]
    layer.routing.task_ids = torch.tensor(tasks)
    torch.testing.assert_close(layer(x), slow_forward(layer, x, tasks), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("router", ["softmax", "topk"])
def test_router_weights_sum_to_one_and_topk_is_sparse(router):
    layer = make_layer("alora", router, top_k=2)
    g = layer.gates(torch.randn(5, 7, D_IN, dtype=torch.float64))
    assert g.shape == (5, 7, K)
    torch.testing.assert_close(g.sum(-1), torch.ones(5, 7, dtype=torch.float64))
    assert (g >= 0).all()
    nonzero = (g > 0).sum(-1)
    assert (nonzero == (2 if router == "topk" else K)).all()


def test_task_router_without_task_ids_says_how_to_pass_them():
    layer = make_layer("alora", "task")
    with pytest.raises(RuntimeError, match="task_ids"):
        layer(torch.randn(1, 2, D_IN, dtype=torch.float64))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    cfg = AdapterConfig(method="alora", r=R, dropout=0.5, num_experts=K)
    layer = MultiLoraLinear(nn.Linear(D_IN, D_OUT), cfg, "p", RoutingState())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, D_IN)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def _a_blocks(layer):
    return layer.lora_A.detach().view(layer.k_a, layer.r, -1)


def test_independent_and_identical_initialisation():
    indep = _a_blocks(make_layer("alora", "softmax"))
    cfg = AdapterConfig(method="alora", r=R, num_experts=K, init_a="identical", seed=0)
    same = _a_blocks(MultiLoraLinear(nn.Linear(D_IN, D_OUT).double(), cfg, "blocks.0.proj", RoutingState()))
    assert all(torch.equal(same[0], same[i]) for i in range(K)), "identical: every A equals the first"
    assert not any(torch.equal(indep[i], indep[j]) for i in range(K) for j in range(i)), (
        "independent: all differ"
    )
    torch.testing.assert_close(indep[0], same[0].to(indep.dtype))  # the first draw is shared
    bound = 1 / math.sqrt(D_IN)  # kaiming_uniform(a=sqrt 5)
    assert indep.abs().max() <= bound and indep.abs().max() > 0.8 * bound


def test_initialisation_depends_only_on_seed_and_module_name():
    a0 = make_layer("alora", "softmax", seed=0).lora_A
    assert torch.equal(a0, make_layer("alora", "softmax", seed=0).lora_A)
    assert not torch.equal(a0, make_layer("alora", "softmax", seed=1).lora_A)
    cfg = AdapterConfig(method="mola", r=R, num_experts=K)
    fresh = MultiLoraLinear(nn.Linear(D_IN, D_OUT), cfg, "x", RoutingState())
    assert (fresh.lora_B == 0).all(), "B starts at zero so the wrapped model starts equal to the base"


def test_efficient_shapes_are_stacked():
    layer = make_layer("alora", "softmax")
    assert layer.lora_A.shape == (K * R, D_IN) and layer.lora_B.shape == (D_OUT, R)
    assert layer.router.shape == (K, D_IN)
    hydra = make_layer("hydralora", "task")
    assert hydra.lora_A.shape == (R, D_IN) and hydra.lora_B.shape == (D_OUT, K * R) and hydra.router is None


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_factored_layer_matches_its_formula(conv):
    torch.manual_seed(0)
    base = (Conv1D(D_OUT, D_IN) if conv else nn.Linear(D_IN, D_OUT)).double()
    cfg = AdapterConfig(method="factored", r=R, d_m=5, alpha=6.0, dropout=0.0)
    layer = FactoredLoraLinear(base, cfg, "blocks.0.proj", RoutingState())
    x = torch.randn(2, 4, D_IN, dtype=torch.float64)
    assert torch.equal(layer(x), base(x)), "B2 = 0 and B_base = 0: starts equal to the base"
    with torch.no_grad():
        layer.lora_B2.normal_()
        layer.lora_B_base.normal_()
    w0 = base.weight.T if conv else base.weight
    s = 6.0 / R
    A, M, B1, B2, Bb = layer.lora_A, layer.lora_M, layer.lora_B1, layer.lora_B2, layer.lora_B_base
    for b in range(2):
        for t in range(4):
            v = x[b, t]
            expected = w0 @ v + base.bias + s * ((Bb + B2 @ B1) @ (M @ (A @ v)))
            torch.testing.assert_close(layer(x)[b, t], expected, rtol=1e-10, atol=1e-10)
    assert not layer.lora_B_base.requires_grad and layer.lora_B2.requires_grad
    assert layer.lora_A.shape == (R, D_IN) and layer.lora_M.shape == (5, R) and layer.lora_B1.shape == (R, 5)


def test_factored_layer_draws_a_then_m_then_b1_from_its_module_seed():
    """The initial values are the module generator's draws in the order A, M, B1 (changing the
    order would change every Fed-ALoRA-het run); B2 and B_base start at zero."""
    base = nn.Linear(D_IN, D_OUT)
    cfg = AdapterConfig(method="factored", r=R, d_m=5, seed=7)
    layer = FactoredLoraLinear(base, cfg, "blocks.0.proj", RoutingState())
    gen = module_generator(7, "blocks.0.proj")
    for name, shape in [("lora_A", (R, D_IN)), ("lora_M", (5, R)), ("lora_B1", (R, 5))]:
        torch.testing.assert_close(getattr(layer, name).detach(), kaiming_uniform(shape, gen).float())
    assert not layer.lora_B2.any() and not layer.lora_B_base.any()
    assert layer.lora_B2.shape == (D_OUT, R) and layer.lora_B_base.shape == (D_OUT, 5)


@pytest.mark.parametrize(
    ("method", "router"),
    [("lora", None), ("alora", "softmax"), ("hydralora", "task"), ("mola", "topk"), ("factored", None)],
)
def test_planned_parameters_are_the_numbers_the_layer_allocates(method, router):
    cfg = AdapterConfig(method=method, r=R, d_m=5, num_experts=1 if method == "lora" else K, router=router)
    kind = FactoredLoraLinear if method == "factored" else MultiLoraLinear
    layer = kind(nn.Linear(D_IN, D_OUT), cfg, "blocks.0.proj", RoutingState())
    allocated = sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer"))
    assert kind.planned_parameters(cfg, D_IN, D_OUT) == allocated
