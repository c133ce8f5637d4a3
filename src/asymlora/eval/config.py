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
