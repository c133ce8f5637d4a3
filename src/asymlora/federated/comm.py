"""Communication accounting: parameters and bytes sent per client per round, for every method.

Two ways, which must agree (tests run a round of every method and compare):

- from what is really sent: :func:`count` of an upload or download dict (numel x element size);
- from shapes alone, without weights: :func:`comm_table` builds the model on the meta device
  from a config (a bundled name, a local ``config.json`` or its folder, or a hub id), finds the
  target modules and sums each method's ``comm_per_module`` over them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.model import check_ranks_within
from ..errors import InputError, check_at_least
from .base import FederatedMethod
from .common import Tensors
from .registry import METHODS, get_method

BUNDLED_SHAPES = ("llama-2-7b", "llama-3-8b", "qwen2-7b")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPES |= {"float16": torch.float16, "fp16": torch.float16}
MB = 1e6  # tables report megabytes of 10^6 bytes


def count(tensors: Mapping[str, Tensor]) -> tuple[int, int]:
    """(parameters, bytes) in a dict of tensors, as it would be sent."""
    params = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return params, nbytes


def load_config(spec: str) -> Any:
    """A transformers config from a bundled shape name, a local config.json (or its folder), or a hub id."""
    from transformers import AutoConfig

    if spec in BUNDLED_SHAPES:
        with resources.as_file(resources.files("asymlora") / "resources" / "shapes" / spec) as folder:
            return AutoConfig.from_pretrained(str(folder))
    try:
        return AutoConfig.from_pretrained(spec)  # a local path, or a hub id (needs the hub or a cache)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = (
            "a local path that holds no readable config.json"
            if os.path.exists(spec)
            else ("not a local path, and the hub did not answer")
        )
        raise InputError(
            f"cannot load a config for {spec!r}: not one of {', '.join(BUNDLED_SHAPES)}, {where} ({first})"
        ) from err


MAX_LAYERS = 1000  # blocks of a model config (the largest models have about 130)


def meta_model(config: Any) -> nn.Module:
    """The model for ``config`` on the meta device: shapes only, no memory, no weights. A config
    of more than ``MAX_LAYERS`` blocks is refused: each block is built as Python objects even
    there (2,000 blocks of Llama-2-7B take 13 s and 460 MB)."""
    from transformers import AutoModel, AutoModelForCausalLM

    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > MAX_LAYERS:
        raise InputError(f"num_hidden_layers={layers} in the model config: more than {MAX_LAYERS} blocks")
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def target_dims(
    model: nn.Module, targets: str | Sequence[str], layers: Sequence[int] | None = None
) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every target module of ``model``, by name."""
    from ..adapters.targets import find_target_modules, layer_dims

    return {name: layer_dims(m) for name, m in find_target_modules(model, targets, layers).items()}


def per_client(
    method: FederatedMethod,
    dims: Mapping[str, tuple[int, int]],
    ranks: Sequence[int],
    d_m: int = 16,
) -> list[tuple[int, int]]:
    """(params up, params down) for each client in one round, all clients taking part. Counted once
    per distinct rank (clients of one rank send and receive the same), so the work grows with the
    number of clients only through the list it returns."""
    ranks = list(ranks)
    by_rank = {}
    for rank in dict.fromkeys(ranks):
        pairs = [method.comm_per_module(d_in, d_out, rank, ranks, d_m) for d_in, d_out in dims.values()]
        by_rank[rank] = (sum(u for u, _ in pairs), sum(d for _, d in pairs))
    return [by_rank[rank] for rank in ranks]


def comm_table(
    config: str | Any,
    targets: str | Sequence[str],
    rank: int,
    ranks: Sequence[int] | None = None,
    d_m: int = 16,
    methods: str | Sequence[str] = "all",
    dtype: torch.dtype | str = torch.float32,
    num_clients: int = 8,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Per client per round communication of each method, from shapes alone, as a JSON-able dict.

    Homogeneous methods use ``rank`` for every client. Heterogeneous methods use ``ranks``
    (one per client), or ``num_clients`` clients at ``rank`` when ``ranks`` is None. Every
    client takes part in every round. ``dtype`` is the element type sent (float32: 4 bytes).
    Per method: per-client lists, and their mean over clients (equal for homogeneous methods).
    """
    for name, value in [
        ("rank", rank),
        ("d_m", d_m),
        ("num_clients", num_clients),
        *((f"ranks[{i}]", r) for i, r in enumerate(ranks or [])),
    ]:
        check_at_least(name, value, 1)
    if isinstance(targets, str) and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = list(METHODS) if methods == "all" else _split(methods)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    elem = torch.empty((), dtype=dtype).element_size()
    if isinstance(config, str):
        model_name = config
        dims = _dims_of_named(config, _freeze(targets), None if layers is None else tuple(layers))
    else:
        model_name = getattr(config, "name_or_path", "") or type(config).__name__
        dims = target_dims(meta_model(config), targets, layers)
    het_ranks = list(ranks) if ranks is not None else [rank] * num_clients
    check_ranks_within(
        min(min(d) for d in dims.values()),
        {"rank": rank, "d_m": d_m} | {f"ranks[{i}]": r for i, r in enumerate(ranks or [])},
    )
    rows: dict[str, Any] = {}
    for name in names:
        method = get_method(name)
        client_ranks = het_ranks if method.heterogeneous else [rank] * len(het_ranks)
        pairs = per_client(method, dims, client_ranks, d_m)
        n = len(pairs)
        rows[name] = {
            "heterogeneous": method.heterogeneous,
            "ranks": client_ranks,
            "params_up": [u for u, _ in pairs],
            "params_down": [d for _, d in pairs],
            "mean_params_up": sum(u for u, _ in pairs) / n,
            "mean_params_down": sum(d for _, d in pairs) / n,
            "mean_bytes_up": elem * sum(u for u, _ in pairs) / n,
            "mean_bytes_down": elem * sum(d for _, d in pairs) / n,
            "mean_total_mb": elem * sum(u + d for u, d in pairs) / n / MB,
        }
    return {
        "model": model_name,
        "targets": targets if isinstance(targets, str) else list(targets),
        "modules": len(dims),
        "rank": rank,
        "ranks": het_ranks,
        "d_m": d_m,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes_per_param": elem,
        "methods": rows,
    }


def format_table(table: Mapping[str, Any]) -> str:
    """A Markdown table of :func:`comm_table`'s result: one row per method, per client per round."""
    head = (
        f"Communication per client per round: {table['model']}, targets {table['targets']} "
        f"({table['modules']} modules), {table['dtype']} ({table['bytes_per_param']} B/param), "
        f"d_m = {table['d_m']}; heterogeneous methods: mean over clients of ranks "
        f"{','.join(map(str, table['ranks']))}.\n\n"
    )
    lines = [
        "| method | ranks | params up | params down | bytes up | bytes down | total MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in table["methods"].items():
        ranks = sorted(set(row["ranks"]), reverse=True)
        lines.append(
            f"| {name} | {','.join(map(str, ranks))} | {_num(row['mean_params_up'])} "
            f"| {_num(row['mean_params_down'])} | {_num(row['mean_bytes_up'])} "
            f"| {_num(row['mean_bytes_down'])} | {row['mean_total_mb']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def to_json(table: Mapping[str, Any]) -> str:
    """:func:`comm_table`'s result as indented JSON."""
    return json.dumps(table, indent=2)


WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_wire(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> Tensors:
    """``tensors`` as they travel: cast to the wire dtype (the same objects for float32)."""
    return {k: v if v.dtype == dtype else v.to(dtype) for k, v in tensors.items()}


def from_wire(tensors: Mapping[str, Tensor]) -> Tensors:
    """Received tensors back in float32 (or wider), the dtype clients and the server compute in."""
    return {k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in tensors.items()}


def round_counts(uploads: Sequence[Tensors], downloads: Sequence[Tensors]) -> list[dict[str, int]]:
    """Per client, what one round really transferred: params and bytes, up and down."""
    out = []
    for up, down in zip(uploads, downloads, strict=True):
        (pu, bu), (pd, bd) = count(up), count(down)
        out.append({"params_up": pu, "bytes_up": bu, "params_down": pd, "bytes_down": bd})
    return out


@lru_cache(maxsize=8)
def _dims_of_named(
    spec: str, targets: str | tuple[str, ...], layers: tuple[int, ...] | None
) -> dict[str, tuple[int, int]]:
    # Building a 7B model on the meta device takes seconds; tables for one model reuse it.
    return target_dims(meta_model(load_config(spec)), targets, layers)


def _freeze(targets: str | Sequence[str]) -> str | tuple[str, ...]:
    return targets if isinstance(targets, str) else tuple(targets)


def _split(methods: str | Sequence[str]) -> list[str]:
    return [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"
