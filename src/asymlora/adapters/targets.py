"""Which modules of a model get an adapter: target names (suffix match, as in PEFT) or a regex,
optionally restricted to some layer indices."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from ..errors import InputError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def is_adaptable(module: nn.Module) -> bool:
    """A module we know how to wrap: ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


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
