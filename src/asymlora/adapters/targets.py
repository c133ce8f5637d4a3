"""Which modules of a model get an adapter: target names (suffix match, as in PEFT) or a regex,
optionally restricted to some layer indices."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from ..errors import InputError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``, which stores its weight as (d_in, d_out), not ``nn.Linear``'s (d_out, d_in)."""
    return type(module).__name__ == "Conv1D"


def is_adaptable(module: nn.Module) -> bool:
    """A module we know how to wrap: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an adaptable module (shapes only: works on the meta device)."""
    shape = module.weight.shape
    d_in, d_out = shape if is_conv1d(module) else shape[::-1]
    return int(d_in), int(d_out)


def weight_layout(module: nn.Module, delta: Tensor) -> Tensor:
    """An update ``delta`` (d_out, d_in) in the layout of ``module``'s weight."""
    return delta.T if is_conv1d(module) else delta


def layer_index(name: str) -> int | None:
    """The transformer block a module belongs to (``model.layers.3.self_attn.q_proj`` -> 3)."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def name_matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list holds names that
    must equal the module name or be its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(
    model: nn.Module,
    targets: str | Sequence[str],
    layers: Iterable[int] | None = None,
) -> dict[str, nn.Module]:
    """All adaptable modules of ``model`` selected by ``targets`` and ``layers``, by full name.

    Raises ``ValueError`` naming the targets and a few module names when nothing matches, since
    a silent no-op adapter is the worst outcome of a typo.
    """
    wanted_layers = None if layers is None else set(layers)
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not is_adaptable(module) or not name_matches(name, targets):
            continue
        if wanted_layers is not None and layer_index(name) not in wanted_layers:
            continue
        found[name] = module
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_adaptable(m)})
        raise InputError(
            f"no module of {type(model).__name__} matches target_modules={targets!r}"
            + (f" in layers {sorted(wanted_layers)}" if wanted_layers is not None else "")
            + f"; its linear modules are named: {', '.join(leaves)}"
        )
    return found
