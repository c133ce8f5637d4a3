"""The adapter configuration: which multi-LoRA shape, where, and how it starts.

Methods are data, not subclasses: each method name fixes how many down-projections (K_a) and
up-projections (K_b) a wrapped layer holds; everything else is shared.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import read_json
from ..errors import InputError, MissingFileError

OWN_METHODS = ("lora", "alora", "hydralora", "mola", "factored")
# PEFT's own multi-LoRA methods, built and run by PEFT as anchors beside ours (peft_anchors.py)
PEFT_ANCHORS = ("peft:lily", "peft:poly")
METHODS = OWN_METHODS + PEFT_ANCHORS
REFUSED_METHODS = {
    "peft:xlora": "is not supported: PEFT's X-LoRA mixes LoRA experts trained beforehand (XLoraConfig.adapters) "
    "instead of training from scratch, and its scaling pass writes into the KV cache the evaluator scores with "
    "(docs/peft-anchors.md); choose peft:lily or peft:poly",
}
SINGLE = ("lora", "factored")  # one adapter, no router
ROUTERS = ("softmax", "topk", "task")
LEARNED_ROUTERS = ("softmax", "topk")  # a router with weights of its own (K, d_in), trained with the adapter
INITS = ("independent", "identical")
PARAM_DTYPES = ("float32", "base")
FORMAT_VERSION = 1


MAX_SCALE = 1000.0
"""The largest scale (alpha / r, or alpha / sqrt(r) for rsLoRA) an adapter may have: LoRA uses
0.5-16; past this an adapter is damaged or made up, and its scores would mean nothing."""


@dataclass
class AdapterConfig:
    """Every field has a default; ``validate()`` is called on construction and on load."""

    method: str = field(
        default="alora",
        metadata={
            "help": "lora | alora (K A's, one B) | hydralora (one A, K B's) | mola (K pairs) | peft:lily | "
            "peft:poly (PEFT's own, sized to alora's trainable parameters: docs/peft-anchors.md)"
        },
    )
    r: int = field(default=8, metadata={"help": "rank of each adapter"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: the update is (alpha / r) B A x"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the input of the A's (training only)"})
    num_experts: int = field(
        default=3, metadata={"help": "K: number of A's (alora), B's (hydralora) or pairs (mola); 1 for lora"}
    )
    router: str | None = field(
        default="softmax",
        metadata={"help": "softmax (dense, per token) | topk | task (hard, by task id); None for lora"},
    )
    top_k: int = field(default=1, metadata={"help": "experts kept per token by the topk router"})
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "o_proj"],
        metadata={"help": "module names (suffix match) or one regex over full names"},
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "only these transformer blocks (None: all)"}
    )
    init_a: str = field(
        default="independent",
        metadata={"help": "independent (one seeded draw per A) | identical (all A's equal at start)"},
    )
    d_m: int = field(
        default=16, metadata={"help": "factored only: width of the shared up-projection B_base (d_out, d_m)"}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "float32 (full-precision adapter weights over any base) | base (the base weights' "
            "dtype, e.g. bfloat16: half the adapter and optimizer-state memory)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of every random draw of the adapter"})
    balance_loss: float = field(
        default=0.0,
        metadata={
            "help": "weight of the load-balancing loss, KL(mean gate weight per expert || uniform) averaged "
            "over the adapted modules, added to the training loss (0: off; learned routers only: docs/router.md)"
        },
    )
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "recorded for reloading; not used to build"}
    )
    model_type: str | None = field(
        default=None, metadata={"help": "architecture the adapter was made for (filled in on injection)"}
    )

    def __post_init__(self) -> None:
        if self.method in SINGLE:
            self.num_experts, self.router = 1, None
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def learned_router(self) -> bool:
        """Whether each adapted module has a router of its own (softmax or topk) over K >= 2 experts."""
        return self.method in OWN_METHODS and self.num_experts > 1 and self.router in LEARNED_ROUTERS

    @property
    def k_a(self) -> int:
        """Number of down-projections A."""
        return self.num_experts if self.method in ("alora", "mola") else 1

    @property
    def k_b(self) -> int:
        """Number of up-projections B."""
        return self.num_experts if self.method in ("hydralora", "mola") else 1

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"adapter config: {key}={getattr(self, key)!r} {why}")

        if self.method not in METHODS:
            raise bad("method", REFUSED_METHODS.get(self.method, f"is not one of {', '.join(METHODS)}"))
        if self.method in PEFT_ANCHORS and self.dtype != "float32":
            raise bad("dtype", f"must be float32 for {self.method} (PEFT keeps its adapters in float32)")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise bad("r", "must be an integer >= 1")
        if (
            not isinstance(self.alpha, int | float)
            or isinstance(self.alpha, bool)
            or not 0 < self.alpha < math.inf
        ):
            raise bad("alpha", "must be a finite number > 0")
        if self.alpha / self.r > MAX_SCALE:
            raise bad(
                "alpha",
                f"gives the scale alpha / r = {self.alpha / self.r:.3g}; at most {MAX_SCALE:g} is taken",
            )
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if self.method not in SINGLE:
            if not isinstance(self.num_experts, int) or self.num_experts < 2:
                raise bad(
                    "num_experts", f"must be an integer >= 2 for {self.method} (use method='lora' for one)"
                )
            if self.router not in ROUTERS:
                raise bad("router", f"must be one of {', '.join(ROUTERS)} for {self.method}")
        if self.router == "topk" and not (
            isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts
        ):
            raise bad("top_k", f"must be an integer in [1, num_experts={self.num_experts}]")
        if not (isinstance(self.target_modules, str) and self.target_modules) and not (
            isinstance(self.target_modules, list)
            and self.target_modules
            and all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise bad("target_modules", "must be a non-empty list of module names or a regex string")
        if isinstance(self.target_modules, str) and not _is_regex(self.target_modules):
            raise bad("target_modules", "is not a valid regular expression")
        if self.layers is not None and not (
            isinstance(self.layers, list) and all(isinstance(i, int) and i >= 0 for i in self.layers)
        ):
            raise bad("layers", "must be a list of non-negative block indices or None")
        if not isinstance(self.d_m, int) or isinstance(self.d_m, bool) or self.d_m < 1:
            raise bad("d_m", "must be an integer >= 1")
        if self.init_a not in INITS:
            raise bad("init_a", f"must be one of {', '.join(INITS)}")
        if self.dtype not in PARAM_DTYPES:
            raise bad("dtype", f"must be one of {', '.join(PARAM_DTYPES)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise bad("seed", "must be an integer")
        if (
            not isinstance(self.balance_loss, int | float)
            or isinstance(self.balance_loss, bool)
            or not 0 <= self.balance_loss < math.inf
        ):
            raise bad("balance_loss", "must be a finite number >= 0 (0: off)")
        if self.balance_loss and not self.learned_router:
            raise bad("balance_loss", "balances a learned router's experts: it needs router softmax or topk "
                      "with num_experts >= 2 (set it to 0)")  # fmt: skip

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": "asymlora", "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "adapter config") -> AdapterConfig:
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", "asymlora")
        version = data.pop("format_version", FORMAT_VERSION)
        if fmt != "asymlora":
            hint = (
                " (this looks like a PEFT adapter: load it with peft.PeftModel)"
                if "peft_type" in data
                else ""
            )
            raise InputError(f"{source}: not an asymlora adapter (format={fmt!r}){hint}")
        if version != FORMAT_VERSION:
            raise InputError(
                f"{source}: format_version {version!r} is not supported (this asymlora reads {FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise InputError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AdapterConfig:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: no adapter config here (expected adapter_config.json)")
        return cls.from_dict(read_json(path), source=str(path))


def is_anchor(method: str) -> bool:
    """Whether ``method`` is one of PEFT's own methods, built and run by PEFT (``PEFT_ANCHORS``)."""
    return method in PEFT_ANCHORS


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True
