"""Client partitions of a pooled dataset: a Dirichlet(alpha) label skew, the usual non-IID split.

Each example carries a label (for a pool of tasks: the task it comes from). For every label the
shares of the N clients are drawn from Dirichlet(alpha, ..., alpha) and that label's examples are
cut accordingly. Small alpha gives each client few labels (alpha = 0.1: nearly one each); large
alpha gives every client about the same mix (alpha -> infinity: an IID split).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from asymlora.errors import InputError

MAX_DRAWS = 100  # redraws allowed to give every client at least ``min_size`` examples


def dirichlet_split(
    labels: Sequence[int], num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[list[int]]:
    """Indices of ``labels`` for each of ``num_clients`` clients (each list sorted).

    Deterministic in ``seed``. Redraws the whole split while some client holds fewer than
    ``min_size`` examples, and raises ValueError when that does not succeed (too few examples
    for the number of clients, or alpha too small)."""
    if num_clients < 1:
        raise InputError(f"num_clients={num_clients} must be >= 1")
    if alpha <= 0:
        raise InputError(f"alpha={alpha} must be > 0")
    if len(labels) < num_clients * min_size:
        raise InputError(f"{len(labels)} examples cannot give {num_clients} clients at least {min_size} each")
    rng = np.random.default_rng(seed)
    by_label: dict[int, np.ndarray] = {}
    for label in sorted(set(labels)):
        by_label[label] = np.flatnonzero(np.asarray(labels) == label)
    for _ in range(MAX_DRAWS):
        parts = _one_draw(by_label, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise InputError(
        f"no Dirichlet(alpha={alpha}) split in {MAX_DRAWS} draws gave each of {num_clients} clients "
        f"at least {min_size} examples; raise alpha or lower the number of clients"
    )


def _one_draw(
    by_label: dict[int, np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for indices in by_label.values():
        shuffled = rng.permutation(indices)
        shares = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(shuffled)).round().astype(int)
        for client, chunk in enumerate(np.split(shuffled, cuts)):
            parts[client].extend(int(i) for i in chunk)
    return [sorted(p) for p in parts]
