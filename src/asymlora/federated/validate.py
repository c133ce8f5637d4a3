"""Checks on client uploads before the server aggregates them.

A federation takes tensors from machines the server does not control. Before aggregation every
upload is checked against what the method's ``upload()`` would produce for that client's state
layout (its rank, its modules), and is refused, with a reason, when:

- a tensor name is missing or not expected (an extra tensor, a private part such as Fed-ALoRA's A);
- a shape differs from the expected one (a different rank than the client declared);
- a dtype is not a floating point type, or differs from the client's state dtype;
- a value is NaN or infinite;
- the norm exceeds ``max_norm``: with ``norm="total"`` the L2 norm of all the upload's tensors
  together (sqrt of the sum of squares over every element), with ``norm="tensor"`` the largest
  Frobenius norm of any one tensor. ``max_norm=None`` turns the bound off.

Accepted uploads pass through unchanged (the same tensor objects), so validation never changes
what an honest federation computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from .base import FederatedMethod
from .common import Tensors

NORMS = ("total", "tensor")


@dataclass(frozen=True)
class Spec:
    """What one tensor of an upload must look like."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class UploadLimits:
    """The configurable part of validation: the norm bound and what it applies to."""

    max_norm: float | None = None
    norm: str = "total"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise InputError(f"norm={self.norm!r} must be one of {', '.join(NORMS)}")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise InputError(f"max_norm={self.max_norm} must be a finite number > 0 (or None)")


def expected_upload(
    method: FederatedMethod, state: Mapping[str, Tensor], dtype: torch.dtype | None = None
) -> dict[str, Spec]:
    """The names, shapes and dtypes ``method.upload`` produces from a client state of this layout
    (for instance the client's round-0 state, which has its declared rank); ``dtype``: the
    dtype uploads travel in, when it is not the state's."""
    return {k: Spec(tuple(v.shape), dtype or v.dtype) for k, v in method.upload(state).items()}


def check_upload(upload: Mapping[str, Tensor], spec: Mapping[str, Spec], limits: UploadLimits) -> str | None:
    """Why ``upload`` is refused, or None when it is acceptable."""
    if not isinstance(upload, Mapping):
        return f"not a mapping of named tensors ({type(upload).__name__})"
    extra = sorted(set(upload) - set(spec))
    if extra:
        return f"unexpected tensor(s) {', '.join(map(str, extra[:3]))}"
    missing = sorted(set(spec) - set(upload))
    if missing:
        return f"missing tensor(s) {', '.join(missing[:3])}"
    for key, want in spec.items():
        reason = _check_tensor(upload[key], want)
        if reason is not None:
            return f"{key}: {reason}"
    return _check_norm(upload, limits)


def _check_tensor(value: object, want: Spec) -> str | None:
    if not isinstance(value, Tensor):
        return f"not a tensor ({type(value).__name__})"
    if not value.dtype.is_floating_point:
        return f"dtype {value.dtype} is not a float type"
    if value.dtype != want.dtype:
        return f"dtype {value.dtype}, expected {want.dtype}"
    if tuple(value.shape) != want.shape:
        return f"shape {tuple(value.shape)}, expected {want.shape}"
    if not bool(torch.isfinite(value).all()):
        return "holds NaN or infinite values"
    return None


def _check_norm(upload: Mapping[str, Tensor], limits: UploadLimits) -> str | None:
    if limits.max_norm is None or not upload:
        return None
    norms = {k: float(torch.linalg.vector_norm(v.detach().double())) for k, v in upload.items()}
    if limits.norm == "tensor":
        key = max(norms, key=norms.__getitem__)
        if norms[key] > limits.max_norm:
            return f"{key}: norm {norms[key]:.4g} exceeds max_upload_norm={limits.max_norm:g}"
        return None
    total = math.sqrt(sum(n * n for n in norms.values()))
    if total > limits.max_norm:
        return f"total norm {total:.4g} exceeds max_upload_norm={limits.max_norm:g}"
    return None


def validate_uploads(
    uploads: Sequence[tuple[int, Mapping[str, Tensor]]],
    specs: Mapping[int, Mapping[str, Spec]],
    limits: UploadLimits | None = None,
) -> tuple[list[tuple[int, Tensors]], list[tuple[int, str]]]:
    """Split ``(client, upload)`` pairs into accepted ones and ``(client, reason)`` rejections;
    ``specs[client]`` is that client's ``expected_upload``. Order is kept."""
    limits = limits or UploadLimits()
    accepted: list[tuple[int, Tensors]] = []
    rejected: list[tuple[int, str]] = []
    for client, upload in uploads:
        reason = check_upload(upload, specs[client], limits)
        if reason is None:
            accepted.append((client, dict(upload)))
        else:
            rejected.append((client, reason))
    return accepted, rejected
