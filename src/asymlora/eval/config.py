"""The ``eval`` section of a recipe's config: how many test examples per task, in batches of
what size, cut to what context length."""

from __future__ import annotations

from dataclasses import dataclass, field

from asymlora.config import ConfigError


@dataclass
class EvalConfig:
    limit: int | None = field(default=200, metadata={"help": "test examples per task (None: all)"})
    batch_size: int = field(
        default=16,
        metadata={
            "help": "questions per forward (multiple choice: each with all its choices) or rows decoded at once"
        },
    )
    max_length: int = field(
        default=1024, metadata={"help": "context tokens at evaluation (prompt kept from the right)"}
    )

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit={self.limit} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size} must be >= 1")


@dataclass
class TrainingEvalConfig(EvalConfig):
    """``train``'s eval section: ``EvalConfig``, and evaluation during training."""

    every: int | None = field(
        default=None,
        metadata={
            "help": "also evaluate (scores and validation loss on the test questions) every N optimizer "
            "steps (leave out: only at the end)"
        },
    )
    keep_best: bool = field(
        default=False,
        metadata={"help": "keep the adapter of the best average score as adapter-best/ (needs eval.every)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.every is not None and self.every < 1:
            raise ConfigError(
                f"eval.every={self.every} must be >= 1 (leave it out to evaluate only at the end)"
            )
        if self.keep_best and self.every is None:
            raise ConfigError(
                "eval.keep_best=true needs eval.every (the steps at which the adapter is scored)"
            )
