"""The formulas of the analysis, each in one place, on plain tensors.

Every function takes matrices whose *rows* are the vectors of interest (see ``weights.directions``:
the rows of an A block, the columns of a B block) and computes in float64."""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import combinations

import torch
from torch import Tensor

from ..errors import InputError


def top_row_basis(m: Tensor, k: int) -> Tensor:
    """The top-``k`` right singular vectors of ``m`` (n, d), as orthonormal columns: (d, k)."""
    _, _, vh = torch.linalg.svd(m.double(), full_matrices=False)  # vh: (min(n, d), d)
    return vh[:k].T


def numerical_rank(m: Tensor) -> int:
    return int(torch.linalg.matrix_rank(m.double()))


def subspace_similarity(x: Tensor, y: Tensor, i: int, j: int) -> float | None:
    """phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j) in [0, 1], the LoRA paper's principal-angle
    similarity of the row spaces of ``x`` (n1, d) and ``y`` (n2, d): U_i are the top-i right
    singular vectors of x, V_j the top-j of y. 1: one subspace contains the other; 0: orthogonal;
    two unrelated random subspaces give max(i, j) / d on average (the chance level to read against).

    None where x or y has fewer than i (j) independent rows: the trailing singular vectors of a
    rank-deficient matrix (B at its zero initialisation, say) are arbitrary, so phi would be noise."""
    if x.shape[1] != y.shape[1]:
        raise InputError(f"cannot compare row spaces of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    for name, m, k in (("i", x, i), ("j", y, j)):
        if not 1 <= k <= min(m.shape):
            raise InputError(
                f"{name}={k} must be in 1..{min(m.shape)} for a matrix of shape {tuple(m.shape)}"
            )
    if numerical_rank(x) < i or numerical_rank(y) < j:
        return None
    overlap = top_row_basis(x, i).T @ top_row_basis(y, j)  # (i, j): cosines of the bases
    return float(overlap.square().sum() / min(i, j))


def norm_change(w0: Tensor, w1: Tensor) -> float:
    """||w1 - w0||_F."""
    return float(torch.linalg.norm((w1.double() - w0.double()).flatten()))


def relative_change(w0: Tensor, w1: Tensor) -> float | None:
    """||w1 - w0||_F / ||w0||_F; None where w0 = 0 (a B at its zero initialisation)."""
    base = float(torch.linalg.norm(w0.double().flatten()))
    return norm_change(w0, w1) / base if base > 0 else None


def row_cosines(x: Tensor, y: Tensor) -> Tensor:
    """Cosine of row k of x with row k of y, (n,); NaN where either row is zero."""
    x, y = x.double(), y.double()
    norms = torch.linalg.norm(x, dim=1) * torch.linalg.norm(y, dim=1)
    dots = (x * y).sum(dim=1)
    return torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.full_like(dots, math.nan))


def direction_change(w0: Tensor, w1: Tensor) -> float | None:
    """Mean over rows of 1 - cos(row of w0, same row of w1), in [0, 2]: 0 unchanged (or rescaled),
    1 orthogonal, 2 reversed. Rows that are zero in either matrix have no direction and are left
    out; None where every row is (a B at its zero initialisation)."""
    cos = row_cosines(w0, w1)
    cos = cos[~cos.isnan()]
    return float((1 - cos).mean()) if cos.numel() else None


def cosine(g1: Tensor, g2: Tensor) -> float | None:
    """Cosine of two tensors taken as flat vectors; None where either is zero."""
    c = row_cosines(g1.reshape(1, -1), g2.reshape(1, -1))[0]
    return None if c.isnan() else float(c)


def pairwise_cosines(grads: Mapping[int, Tensor]) -> list[list]:
    """``[[s, t, cos(g_s, g_t)], ...]`` for every two tasks s < t."""
    return [[s, t, cosine(grads[s], grads[t])] for s, t in combinations(sorted(grads), 2)]


def count_conflicts(cosines: list[list]) -> int:
    """Two tasks' gradients conflict when their cosine is negative (a step for one hurts the
    other); an undefined cosine (a zero gradient) is no conflict."""
    return sum(1 for *_, c in cosines if c is not None and c < 0)


def mean(values: list[float | None]) -> float | None:
    """Mean of the values that are defined; None where none is."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None
