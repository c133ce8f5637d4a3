"""One module for every multi-LoRA shape: a frozen linear layer plus K_a down-projections A,
K_b up-projections B and an optional router g.

    lora       K_a = K_b = 1      dW x = s B A x
    alora      K_a = K,  K_b = 1  dW x = s B sum_i g_i(x) A_i x
    hydralora  K_a = 1,  K_b = K  dW x = s sum_j g_j(x) B_j A x
    mola       K_a = K_b = K      dW x = s sum_i g_i(x) B_i A_i x

All A's are stacked into one matrix ``lora_A: (K_a*r, d_in)`` and all B's into
``lora_B: (d_out, K_b*r)``, so one matmul computes every A_i x and one matmul applies the B's;
the router only rescales the r-blocks in between (ALoRA sums them to r before its single B).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .config import AdapterConfig
from .gates import GateBatch
from .targets import is_conv1d, layer_dims, weight_layout


class RoutingState:
    """Shared by every adapted layer of a model: the task id of each example of the current batch,
    and where learned routers record their gates (``AsymLoraModel.recording_gates``)."""

    def __init__(self) -> None:
        self.task_ids: Tensor | None = None
        self.gates: GateBatch | None = None


def module_generator(seed: int, module_name: str) -> torch.Generator:
    """A generator that depends only on the seed and the module's name, so the same seed gives
    the same initial adapter whatever else the model holds or the order modules are visited."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module_name.encode()))


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``nn.init.kaiming_uniform_(w, a=sqrt(5))`` (LoRA's A init) drawn from ``generator``:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def kaiming_leading(draw: Tensor, dim: int, size: int) -> Tensor:
    """The leading ``size`` rows (``dim`` 0) or columns (``dim`` 1) of a ``kaiming_uniform``
    draw, distributed as a draw of the smaller shape would be: rows are kept as drawn; columns are
    the fan-in, so they are rescaled from the bound 1/sqrt(full) to 1/sqrt(size)."""
    kept = draw.narrow(dim, 0, size).clone()
    return kept * math.sqrt(draw.shape[1] / size) if dim == 1 else kept


def adapter_dtype(setting: str, base: torch.dtype) -> torch.dtype:
    """The adapter parameters' dtype: the base's for ``base``; for ``float32``, float32 (float64
    over a float64 base, for exact gradient checks)."""
    if setting == "base" or base == torch.float64:
        return base
    return torch.float32


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x W^T`` in x's dtype: float32 adapter weights over a bfloat16 model are cast to bfloat16
    for the matmul (a (rank, d) cast, not a (tokens, d) one), as autocast does; their gradients
    arrive in float32."""
    return F.linear(x, weight.to(x.dtype))


class AdapterLayer(nn.Module):
    """What every adapter layer shares: the frozen base layer (``nn.Linear``, weight (d_out, d_in),
    or GPT-2's ``Conv1D``, weight (d_in, d_out)), dropout on the adapter input, and a forward that
    adds ``delta(x)`` to the base output. Subclasses define ``delta`` and ``lora_pair``."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, routing: RoutingState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        weight = base_layer.weight
        self.d_in, self.d_out = layer_dims(base_layer)
        self.r = config.r
        self.scale = config.scale
        self.routing = routing
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.disabled = False
        self.factory = {"device": weight.device, "dtype": adapter_dtype(config.dtype, weight.dtype)}

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        return y + self.delta(x).to(y.dtype)

    @staticmethod
    def planned_parameters(config: AdapterConfig, d_in: int, d_out: int) -> int:
        """How many numbers the layer's adapter will hold, known before it allocates them."""
        raise NotImplementedError

    def delta(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def lora_pair(self, task: int | None = None) -> tuple[Tensor, Tensor]:
        """(A_t: (rank, d_in), B_t: (d_out, rank)) with dW_t = scale * B_t A_t."""
        raise NotImplementedError

    def delta_weight(self, task: int | None = None) -> Tensor:
        """scale * B_t A_t in the base layer's weight layout."""
        a, b = self.lora_pair(task)
        return weight_layout(self.base_layer, self.scale * (b @ a))


class MultiLoraLinear(AdapterLayer):
    """K_a A's, K_b B's and a router: LoRA, ALoRA, HydraLoRA, MoLA."""

    def __init__(
        self, base_layer: nn.Module, config: AdapterConfig, module_name: str, routing: RoutingState
    ) -> None:
        super().__init__(base_layer, config, routing)
        self.module_name = module_name
        self.k_a, self.k_b = config.k_a, config.k_b
        self.num_experts = config.num_experts
        self.router_kind = config.router if config.num_experts > 1 else None
        self.top_k = config.top_k

        gen = module_generator(config.seed, module_name)
        first_a = kaiming_uniform((self.r, self.d_in), gen)
        a_blocks = [first_a] + [
            first_a.clone() if config.init_a == "identical" else kaiming_uniform((self.r, self.d_in), gen)
            for _ in range(self.k_a - 1)
        ]
        self.lora_A = nn.Parameter(torch.cat(a_blocks).to(**self.factory))  # (K_a*r, d_in)
        self.lora_B = nn.Parameter(
            torch.zeros(self.d_out, self.k_b * self.r, **self.factory)
        )  # (d_out, K_b*r)
        self.router = (
            nn.Parameter(kaiming_uniform((self.num_experts, self.d_in), gen).to(**self.factory))
            if config.learned_router
            else None
        )  # (K, d_in)

    @staticmethod
    def planned_parameters(config: AdapterConfig, d_in: int, d_out: int) -> int:
        """lora_A (K_a r, d_in), lora_B (d_out, K_b r) and a learned router (K, d_in)."""
        learned = config.learned_router
        return config.r * (config.k_a * d_in + config.k_b * d_out) + learned * config.num_experts * d_in

    # --- routing ------------------------------------------------------------------------------
    def gates(self, x: Tensor) -> Tensor:
        """Router weights g, shape (..., K) (per token) or (batch, 1, ..., K) (per example)."""
        if self.router_kind == "task":
            return self._task_gates(x)
        logits = linear(x, self.router)  # (..., K)
        if self.router_kind == "softmax":
            g = logits.softmax(-1)
        else:
            top, idx = logits.topk(self.top_k, dim=-1)
            g = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))
        if self.routing.gates is not None:
            self.routing.gates.add(self.module_name, g)
        return g

    def _task_gates(self, x: Tensor) -> Tensor:
        ids = self.routing.task_ids
        if ids is None:
            raise RuntimeError(
                "this adapter routes by task (router='task') but no task ids were given: "
                "call model(..., task_ids=ids) or wrap the call in `with model.route(ids):`"
            )
        if ids.dim() == 0:
            ids = ids.expand(x.shape[0])
        one_hot = F.one_hot(ids.to(x.device), self.num_experts).to(x.dtype)  # (batch, K)
        return one_hot.view(x.shape[0], *([1] * (x.dim() - 2)), self.num_experts)

    def mix(self, h: Tensor, g: Tensor) -> Tensor:
        """Weight the r-blocks of h = A x (..., K_a*r) by g and shape them for B (..., K_b*r)."""
        r, k = self.r, self.num_experts
        if self.k_a == k and self.k_b == 1:  # alora: sum_i g_i A_i x, then one B
            return (g.unsqueeze(-2) @ h.unflatten(-1, (k, r))).squeeze(-2)
        if self.k_a == k:  # mola: each pair keeps its block, weighted
            return (h.unflatten(-1, (k, r)) * g.unsqueeze(-1)).flatten(-2)
        return (g.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)  # hydralora: one A x copied to K B's

    # --- forward ------------------------------------------------------------------------------
    def delta(self, x: Tensor) -> Tensor:
        h = linear(self.dropout(x), self.lora_A)  # (..., K_a*r): every A_i x in one matmul
        if self.num_experts > 1:
            h = self.mix(h, self.gates(x))
        return linear(h * self.scale, self.lora_B)  # B applied once

    # --- plain-LoRA views -----------------------------------------------------------------------
    def check_plain_lora(self, task: int | None) -> int:
        """The task whose update is a fixed B_t A_t, or a ValueError saying why there is none."""
        if self.num_experts == 1:
            return 0
        if self.router_kind != "task":
            raise InputError(
                f"this adapter mixes its {self.num_experts} experts with a learned {self.router_kind} router: "
                "the update depends on each token, so it is not a fixed low-rank matrix and cannot be "
                "merged or exported as a plain LoRA. Train with router='task' to get one LoRA per task."
            )
        if task is None or not 0 <= task < self.num_experts:
            raise InputError(f"choose the task to export or merge: task must be in 0..{self.num_experts - 1}")
        return task

    def lora_pair(self, task: int | None = None) -> tuple[Tensor, Tensor]:
        """(A_t: (r, d_in), B_t: (d_out, r)) with dW_t = scale * B_t A_t."""
        t = self.check_plain_lora(task)
        a = self.lora_A[t * self.r : (t + 1) * self.r] if self.k_a > 1 else self.lora_A
        b = self.lora_B[:, t * self.r : (t + 1) * self.r] if self.k_b > 1 else self.lora_B
        return a, b

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, K_a={self.k_a}, K_b={self.k_b}, "
            f"router={self.router_kind}, scale={self.scale:g}"
        )


FACTORED_DRAWN = ("lora_A", "lora_M", "lora_B1")  # seeded kaiming-uniform, in this order; the rest zeros
FACTORED_FROZEN = "lora_B_base"  # the server's shared B_base: not trained
FACTORED_RANK_DIM = {"lora_A": 0, "lora_M": 1, "lora_B1": 0, "lora_B2": 1}  # where each holds r


def factored_shapes(d_in: int, d_out: int, r: int, d_m: int) -> dict[str, tuple[int, int]]:
    """The factored layer's tensors at one module, by name."""
    return {
        "lora_A": (r, d_in),
        "lora_M": (d_m, r),
        "lora_B1": (r, d_m),
        "lora_B2": (d_out, r),
        "lora_B_base": (d_out, d_m),
    }


class FactoredLoraLinear(AdapterLayer):
    """Fed-ALoRA-het's client adapter: a rank-r client whose up-projection is a frozen shared
    B_base (d_out, d_m) plus its own low-rank correction B2 B1, behind a private M A:

        dW x = s (B_base + B2 B1) M A x

    Its tensors are ``factored_shapes``: lora_A, lora_M and lora_B1 seeded kaiming-uniform,
    lora_B2 and lora_B_base zeros, so the model starts equal to its base. B_base is not
    trained (the server sends it)."""

    def __init__(
        self, base_layer: nn.Module, config: AdapterConfig, module_name: str, routing: RoutingState
    ) -> None:
        super().__init__(base_layer, config, routing)
        self.d_m = config.d_m
        gen = module_generator(config.seed, module_name)
        for name, shape in factored_shapes(self.d_in, self.d_out, self.r, self.d_m).items():
            tensor = kaiming_uniform(shape, gen) if name in FACTORED_DRAWN else torch.zeros(shape)
            param = nn.Parameter(tensor.to(**self.factory), requires_grad=name != FACTORED_FROZEN)
            setattr(self, name, param)

    @staticmethod
    def planned_parameters(config: AdapterConfig, d_in: int, d_out: int) -> int:
        """The numbers in ``factored_shapes``."""
        return sum(math.prod(s) for s in factored_shapes(d_in, d_out, config.r, config.d_m).values())

    def delta(self, x: Tensor) -> Tensor:
        u = linear(linear(self.dropout(x), self.lora_A), self.lora_M) * self.scale  # (..., d_m)
        return linear(u, self.lora_B_base) + linear(linear(u, self.lora_B1), self.lora_B2)

    def lora_pair(self, task: int | None = None) -> tuple[Tensor, Tensor]:
        """As a plain LoRA of rank d_m: A' = M A (d_m, d_in), B' = B_base + B2 B1 (d_out, d_m)."""
        return self.lora_M @ self.lora_A, self.lora_B_base + self.lora_B2 @ self.lora_B1

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, d_m={self.d_m}, scale={self.scale:g}"
