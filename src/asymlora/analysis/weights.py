"""Adapter weights as the analysis sees them: read from a folder, cut into expert blocks, and
turned so that each block's rows are the directions it holds.

Orientation (one convention for every measurement):
- an A block (r, d_in) reads the input through its r rows, vectors in R^d_in: its row space;
- a B block (d_out, r) writes the output along its r columns, vectors in R^d_out: its column space.
So ``directions("A", a) = a`` and ``directions("B", b) = b.T``, both (r, d). The other side of each
matrix lives in the r rank coordinates, which carry no meaning of their own: (B R^-1)(R A) = B A
for any invertible r x r R, so comparing those spaces across runs would compare arbitrary bases.
This is the comparison the LoRA paper makes (row space of A, column space of B)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..adapters.config import AdapterConfig
from ..adapters.io import CONFIG_FILE, WEIGHTS_FILE, read_tensors
from ..adapters.targets import layer_index
from ..errors import InputError, MissingFileError

KINDS = ("A", "B")
SUBFOLDERS = ("adapter", "checkpoint")  # where a run folder keeps its adapter


def resolve_adapter_folder(path: str | Path) -> Path:
    """``path`` itself if it is an adapter folder, else its ``adapter/`` or ``checkpoint/``."""
    path = Path(path)
    for candidate in (path, *(path / sub for sub in SUBFOLDERS)):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise MissingFileError(
        f"{path}: no adapter here: expected {CONFIG_FILE} in it or in its "
        + " or ".join(f"{s}/" for s in SUBFOLDERS)
    )


def directions(kind: str, block: Tensor) -> Tensor:
    """A block (r, d_in) -> itself; B block (d_out, r) -> its transpose (r, d_out)."""
    return block if kind == "A" else block.T


@dataclass(frozen=True)
class AdapterWeights:
    folder: Path
    config: AdapterConfig
    tensors: dict[str, Tensor]  # "<module>.lora_A": (K_a*r, d_in), "<module>.lora_B": (d_out, K_b*r)

    @property
    def modules(self) -> list[str]:
        """Adapted module names, in block order."""
        names = {k.rpartition(".")[0] for k in self.tensors if k.endswith((".lora_A", ".lora_B"))}
        return sorted(names, key=lambda n: (layer_index(n) is None, layer_index(n) or 0, n))

    def num_blocks(self, kind: str) -> int:
        return self.config.k_a if kind == "A" else self.config.k_b

    def blocks(self, module: str, kind: str) -> list[Tensor]:
        """The module's ``kind`` matrix cut into its expert blocks, each as ``directions`` (r, d)."""
        m = self.tensors[f"{module}.lora_{kind}"]
        r = self.config.r
        parts = m.split(r, dim=0) if kind == "A" else m.split(r, dim=1)
        return [directions(kind, p) for p in parts]

    def block_of(self, kind: str, expert: int) -> int:
        """Which ``kind`` block expert ``expert`` uses: its own where there are several, else the one
        they all share (ALoRA's B, HydraLoRA's A)."""
        return expert if self.num_blocks(kind) > 1 else 0


def load_weights(path: str | Path) -> AdapterWeights:
    """Read an adapter folder (or a run folder holding one); check that every module has an A and a
    B of the shapes its config implies."""
    folder = resolve_adapter_folder(path)
    config = AdapterConfig.load(folder / CONFIG_FILE)
    tensors = read_tensors(folder / WEIGHTS_FILE)
    weights = AdapterWeights(folder, config, tensors)
    if not weights.modules:
        raise InputError(f"{folder / WEIGHTS_FILE}: no lora_A / lora_B tensors in it")
    for module in weights.modules:
        a, b = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2:
            raise InputError(f"{folder / WEIGHTS_FILE}: {module} needs a 2-d lora_A and lora_B")
        if a.shape[0] != config.k_a * config.r or b.shape[1] != config.k_b * config.r:
            raise InputError(
                f"{folder / WEIGHTS_FILE}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"but its config says {config.method} with r={config.r}, num_experts={config.num_experts}"
            )
    return weights


_BLOCK_PREFIX = re.compile(r"^.*?\.\d+\.")


def series_name(module: str) -> str:
    """The module's name without its block prefix (``model.layers.3.self_attn.q_proj`` ->
    ``self_attn.q_proj``): one line per such name in the plots."""
    return _BLOCK_PREFIX.sub("", module, count=1)
