"""What a learned router does with the tokens it sees, read from the gate weights g: (..., K) that
its forward pass computes anyway (no extra forward):

- usage: each expert's mean gate weight over the real tokens (padding left out), summing to 1;
- entropy: the mean over those tokens of H(g) = -sum_k g_k log g_k, in nats (log K: every token
  mixes the K experts equally; 0: each token picks one);
- the load-balancing loss of a module, KL(usage || uniform) = sum_k u_k log(K u_k) = log K - H(usage):
  0 when the experts get equal mean weight, log K when one gets it all. The adapter's balance
  loss is its mean over the adapted modules (docs/router.md says why this one).

``GateBatch`` collects one forward pass (``AsymLoraModel.recording_gates``); ``GateStats`` sums
them over a logging interval or a data set.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def gate_entropy(g: Tensor) -> Tensor:
    """H(g) = -sum_k g_k log g_k over the last dimension (0 log 0 = 0: top-k gates)."""
    return -torch.special.xlogy(g, g).sum(-1)


def balance_kl(usage: Tensor) -> Tensor:
    """KL(usage || uniform) = sum_k u_k log(K u_k) over the last dimension (usage sums to 1)."""
    return torch.special.xlogy(usage, usage * usage.shape[-1]).sum(-1)


def balance_loss(usage: Mapping[str, Tensor]) -> Tensor:
    """The adapter's load-balancing loss: ``balance_kl`` of each module's usage, averaged."""
    return torch.stack([balance_kl(u) for u in usage.values()]).mean()


class GateBatch:
    """One forward pass's gates, added by every learned router while it is set on the model's
    routing state. ``mask`` (batch, seq) marks the real tokens (None: every position is one).
    Per module: ``sums``, detached float32 (K + 2,) = [summed gate weight of each expert, summed
    entropy, tokens], and with ``keep_graph`` also ``usage`` (K,), differentiable, for the
    balance loss."""

    def __init__(self, mask: Tensor | None = None, keep_graph: bool = False) -> None:
        self.mask = mask
        self.keep_graph = keep_graph
        self.sums: dict[str, Tensor] = {}
        self.usage: dict[str, Tensor] = {}

    def add(self, module: str, g: Tensor) -> None:
        with torch.no_grad():  # nothing kept for the backward pass
            real = self._real(g).float()  # (tokens, K)
            count = real.new_tensor([real.shape[0]])
            self.sums[module] = torch.cat([real.sum(0), gate_entropy(real).sum().view(1), count])
        if self.keep_graph:  # bfloat16 gates averaged in float32, float64 ones kept
            real = self._real(g)
            self.usage[module] = real.to(torch.promote_types(real.dtype, torch.float32)).mean(0)

    def _real(self, g: Tensor) -> Tensor:
        """The gates of the real tokens: g at ``mask`` where it covers g's positions (a
        generation step with a cache sees fewer positions than its mask: all of them count)."""
        if self.mask is not None and self.mask.shape == g.shape[:-1]:
            return g[self.mask.bool()]
        return g.reshape(-1, g.shape[-1])


class GateStats:
    """``GateBatch`` sums added up, one (K + 2,) row per module of ``modules``: each module's
    ``usage`` and ``entropy`` over every token added since the last ``reset``."""

    def __init__(self, modules: list[str], num_experts: int, device: torch.device | str = "cpu") -> None:
        self.modules = modules
        self.totals = torch.zeros(len(modules), num_experts + 2, device=device)

    def empty(self) -> GateStats:
        """A ``GateStats`` of the same modules, at zero."""
        return GateStats(self.modules, self.totals.shape[1] - 2, self.totals.device)

    def add(self, batch: GateBatch) -> None:
        self.totals += torch.stack([batch.sums[m] for m in self.modules])

    def reset(self) -> None:
        self.totals.zero_()

    @property
    def tokens(self) -> int:
        return int(self.totals[0, -1]) if self.modules else 0

    def summary(self) -> dict[str, dict]:
        """``{module: {"usage": [K numbers], "entropy": nats}}`` over the tokens added."""
        totals = self.totals.double().cpu()
        return {
            m: {"usage": (row[:-2] / row[-1]).tolist(), "entropy": float(row[-2] / row[-1])}
            for m, row in zip(self.modules, totals, strict=True)
        }

    def state(self) -> list[list[float]]:
        """The totals as JSON numbers (a checkpoint keeps those of an unfinished logging interval)."""
        return self.totals.cpu().tolist()

    def load(self, state: list[list[float]]) -> None:
        """Totals written by ``state``; a ValueError when they do not fit these modules."""
        try:
            totals = torch.tensor(state, dtype=self.totals.dtype)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError("router totals that are not a table of numbers") from None
        if totals.shape != self.totals.shape:
            raise ValueError(
                f"router totals of shape {tuple(totals.shape)}, expected {tuple(self.totals.shape)}"
            )
        self.totals.copy_(totals)
