"""``asymlora federate``'s typed configuration: what the recipe and every engine (the in-process
simulator, Flower) read, so that neither rests on the other.

``FederatedConfig`` composes the sections each layer owns (``train``: ``TrainConfig``,
``clients``: ``data.clients.ClientsConfig``, ``eval``: an ``EvalConfig``) with the federation's
own: the method and its round (``federation``) and the clients' adapters (``adapter``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from .adapters import AdapterConfig
from .config import ConfigError, Override, apply_overrides, from_dict, merge, read_file, to_dict
from .data.clients import ClientsConfig
from .eval.config import EvalConfig
from .federated import FederatedMethod
from .federated.comm import WIRE_DTYPES
from .federated.registry import DEFAULT, METHODS, averaging, get_method, known, options_of, rank_problem
from .federated.validate import NORMS, UploadLimits
from .models import DTYPE_CHOICES, check_base_settings, portable_name
from .train import TrainConfig
from .train.loop import SCHEDULES, decay

_EVAL_FIELDS = {f.name: f for f in fields(EvalConfig)}
METHOD_OPTIONS = ("reset_a_each_round", "client_a_init", "dense_download", "aggregation", "trim")
CENTRAL_DP = ("off", "server", "client")


def _taking(option: str) -> str:
    """The methods that take ``option``, for help texts."""
    return known([m for m in METHODS if option in options_of(m)])


@dataclass
class FederationConfig:
    method: str = field(default=DEFAULT, metadata={"help": "one of " + known()})
    rounds: int = field(default=3, metadata={"help": "communication rounds"})
    fraction: float = field(default=1.0, metadata={"help": "share of the clients taking part in a round"})
    reset_a_each_round: bool = field(
        default=False,
        metadata={
            "help": "put A back to its round-0 value every round; with client_a_init=common, the "
            f"reference's defect ({_taking('reset_a_each_round')})"
        },
    )
    client_a_init: str = field(
        default="independent",
        metadata={
            "help": "independent (each client draws its own initial A) | common (every client starts "
            f"from one A, as the reference does) ({_taking('client_a_init')})"
        },
    )
    dense_download: bool = field(
        default=False,
        metadata={"help": f"send the merged product instead of the stacks ({_taking('dense_download')})"},
    )
    aggregation: str = field(
        default="mean",
        metadata={
            "help": "mean (weighted by examples) | median | trimmed-mean (unweighted, robust to a "
            f"few bad uploads; {_taking('aggregation')})"
        },
    )
    trim: float = field(
        default=0.1, metadata={"help": "trimmed-mean: share of the values dropped at each end"}
    )
    min_clients: int = field(
        default=1,
        metadata={"help": "fewest valid uploads a round may aggregate (after drops and rejections)"},
    )
    max_upload_norm: float | None = field(
        default=None, metadata={"help": "reject an upload whose L2 norm exceeds this (None: no bound)"}
    )
    upload_norm: str = field(
        default="total",
        metadata={"help": "what max_upload_norm bounds: total (all tensors together) | tensor (each)"},
    )
    wire_dtype: str = field(
        default="float32",
        metadata={
            "help": "uploads and downloads travel as float32 | bfloat16 | float16 (aggregated in float32)"
        },
    )
    round_schedule: str = field(
        default="constant",
        metadata={
            "help": "the clients' lr over the rounds: constant | linear | cosine (round t of R "
            "trains at train.lr x the schedule at (t - 1) / R; train.schedule acts within a round)"
        },
    )
    central_dp: str = field(
        default="off",
        metadata={
            "help": "Flower only: central DP with fixed clipping, the update clipped on the server "
            "| on the client; off (docs/flower.md)"
        },
    )
    dp_noise_multiplier: float = field(
        default=1.0, metadata={"help": "central DP: noise std = multiplier * clipping norm / clients"}
    )
    dp_clipping_norm: float = field(default=1.0, metadata={"help": "central DP: L2 bound of each update"})
    dp_delta: float = field(
        default=1e-5,
        metadata={"help": "central DP: the δ at which the run's ε is reported, in (0, 1); below 1 / clients"},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"federation.method={self.method!r} is not one of {known()}")
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds={self.rounds} must be >= 1")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"federation.fraction={self.fraction} must be in (0, 1]")
        self._check_method_options()
        if self.min_clients < 1:
            raise ConfigError(f"federation.min_clients={self.min_clients} must be >= 1")
        bound = self.max_upload_norm
        if bound is not None and not (math.isfinite(bound) and bound > 0):
            raise ConfigError(f"federation.max_upload_norm={bound} must be a finite number > 0 (or null)")
        if self.upload_norm not in NORMS:
            raise ConfigError(
                f"federation.upload_norm={self.upload_norm!r} must be one of {', '.join(NORMS)}"
            )
        if self.round_schedule not in SCHEDULES:
            raise ConfigError(
                f"federation.round_schedule={self.round_schedule!r} must be one of {', '.join(SCHEDULES)}"
            )
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(
                f"federation.wire_dtype={self.wire_dtype!r} must be one of {', '.join(WIRE_DTYPES)}"
            )
        self._check_central_dp()

    def _check_method_options(self) -> None:
        """Options set away from their default must be the method's; the method checks values."""
        accepted = options_of(self.method)
        defaults = {f.name: f.default for f in fields(self)}
        for option in METHOD_OPTIONS:
            if getattr(self, option) != defaults[option] and option not in accepted:
                why = METHODS[self.method].not_an_average if option in ("aggregation", "trim") else None
                raise ConfigError(
                    f"federation.{option} is not an option of {self.method}"
                    + (f": {why} (it fits {known(averaging())})" if why else "")
                )
        try:
            self.make_method()
        except ValueError as err:
            raise ConfigError(f"federation: {err}") from None

    def _check_central_dp(self) -> None:
        if not (math.isfinite(self.dp_delta) and 0 < self.dp_delta < 1):
            raise ConfigError(f"federation.dp_delta={self.dp_delta} must be a number in (0, 1), e.g. 1e-5")
        if self.central_dp not in CENTRAL_DP:
            raise ConfigError(
                f"federation.central_dp={self.central_dp!r} must be one of {', '.join(CENTRAL_DP)}"
            )
        if self.central_dp == "off":
            return
        if self.wire_dtype != "float32":
            raise ConfigError(
                f"federation.central_dp={self.central_dp!r} needs federation.wire_dtype='float32': "
                "Flower's DP wrappers compute in numpy, which has no bfloat16"
            )
        why = METHODS[self.method].not_an_average
        if why is not None:
            raise ConfigError(
                f"federation.central_dp={self.central_dp!r} does not fit {self.method}: {why}; Flower's "
                f"DP wrappers clip and noise an average of the uploads ({known(averaging())})"
            )
        if not (math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier >= 0):
            raise ConfigError(f"federation.dp_noise_multiplier={self.dp_noise_multiplier} must be >= 0")
        if not (math.isfinite(self.dp_clipping_norm) and self.dp_clipping_norm > 0):
            raise ConfigError(f"federation.dp_clipping_norm={self.dp_clipping_norm} must be > 0")

    def wire(self) -> torch.dtype:
        """The dtype uploads and downloads travel in."""
        return WIRE_DTYPES[self.wire_dtype]

    def limits(self) -> UploadLimits:
        """The upload checks' norm bound, for the engine."""
        return UploadLimits(self.max_upload_norm, self.upload_norm)

    def method_options(self) -> dict[str, Any]:
        """The options the chosen method takes, for ``get_method``."""
        accepted = options_of(self.method)
        return {option: getattr(self, option) for option in METHOD_OPTIONS if option in accepted}

    def train_for_round(self, train: TrainConfig, rnd: int) -> TrainConfig:
        """Round ``rnd``'s local training: ``train`` at this round's lr (``round_schedule``)."""
        return replace(train, lr=train.lr * decay(self.round_schedule, (rnd - 1) / self.rounds))

    def make_method(self) -> FederatedMethod:
        """The chosen method with its options (checked when the config was built)."""
        return get_method(self.method, **self.method_options())


@dataclass
class ClientAdapterConfig:
    r: int = field(default=8, metadata={"help": "every client's rank (when ranks is not given)"})
    ranks: list[int] | None = field(
        default=None, metadata={"help": "one rank per client, e.g. [64, 64, 32, 32, 16, 16, 8, 8]"}
    )
    alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha of every client; None: 2 r_i (scale 2, the reference)"}
    )
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None
    d_m: int = field(default=16, metadata={"help": "fedalora-het: width of the shared B_base"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"adapter.r={self.r} must be >= 1")
        if self.ranks is not None and (not self.ranks or min(self.ranks) < 1):
            raise ConfigError(f"adapter.ranks={self.ranks} must be a non-empty list of ranks >= 1")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"adapter.alpha={self.alpha} must be > 0")

    def ranks_for(self, num_clients: int) -> list[int]:
        return list(self.ranks) if self.ranks is not None else [self.r] * num_clients

    def alpha_for(self, rank: int) -> float:
        return self.alpha if self.alpha is not None else 2.0 * rank

    def template(self) -> AdapterConfig:
        """Every client's adapter before its layer kind, rank, alpha and seed (an engine's
        ``client_config`` sets them)."""
        return AdapterConfig(
            method="lora",
            dropout=self.dropout,
            target_modules=self.target_modules,
            layers=self.layers,
            d_m=self.d_m,
        )


@dataclass
class FedEvalConfig(EvalConfig):
    """``EvalConfig`` with fewer test examples by default (every client's tasks are scored on
    every evaluated round), plus when to evaluate and whether to score the global model."""

    limit: int | None = field(default=50, metadata=_EVAL_FIELDS["limit"].metadata)
    every: int = field(default=1, metadata={"help": "evaluate every N rounds (0: only after the last)"})
    global_model: bool = field(default=True, metadata={"help": "also evaluate the global model, if any"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.every < 0:
            raise ConfigError(f"eval.every={self.every} must be >= 0")


def _local_training() -> TrainConfig:
    return TrainConfig(steps=10, batch_size=8, lr=5e-4, schedule="constant")


@dataclass
class FederatedConfig:
    model: str = field(
        default="smollm2-135m", metadata={"help": "smollm2-135m, tiny-llama, a folder or a hub id"}
    )
    output_dir: str = "runs/federated"
    seed: int = field(default=0, metadata={"help": "adapters' initial draws, participants, local batches"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available) | cpu | cuda"})
    dtype: str = field(default="auto", metadata={"help": f"base weights' dtype: {' | '.join(DTYPE_CHOICES)}"})
    federation: FederationConfig = field(default_factory=FederationConfig)
    adapter: ClientAdapterConfig = field(default_factory=ClientAdapterConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(
        default_factory=_local_training, metadata={"help": "one local round: train.steps steps"}
    )
    eval: FedEvalConfig = field(default_factory=FedEvalConfig)

    def __post_init__(self) -> None:
        check_base_settings(self.dtype, self.device)
        # a local folder by its absolute path, so that the run folder loads from anywhere
        self.model = portable_name(self.model)
        n = self.clients.count()
        if self.adapter.ranks is not None and len(self.adapter.ranks) != n:
            raise ConfigError(
                f"adapter.ranks has {len(self.adapter.ranks)} entries but there are {n} clients; "
                "give one rank per client"
            )
        per_round = max(1, round(self.federation.fraction * n))
        if self.federation.min_clients > per_round:
            raise ConfigError(
                f"federation.min_clients={self.federation.min_clients} exceeds the {per_round} "
                f"client(s) taking part in a round ({n} clients, fraction {self.federation.fraction})"
            )
        ranks = self.adapter.ranks_for(n)
        problem = rank_problem(self.federation.method, ranks)
        if problem is not None:
            raise ConfigError(f"adapter.ranks={ranks} with federation.method: {problem}")


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str | Override] | None = None,
    base: dict | None = None,
) -> FederatedConfig:
    """Defaults, then ``base`` (a dict), then the file, then ``section.key=value`` overrides.

    The local-training defaults (``_local_training``) are merged in first, so that a file giving
    only ``train.steps`` keeps the federated defaults for the other training fields."""
    data = merge({"train": to_dict(_local_training())}, base or {})
    data = merge(data, read_file(path) if path else {})
    return from_dict(FederatedConfig, apply_overrides(data, overrides or []))


def save_config(cfg: FederatedConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
