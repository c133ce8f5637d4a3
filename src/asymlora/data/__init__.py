"""Tasks, suites and prompt templates: BIG-bench JSON, reasoning-gym, and local files in the
paper's formats, all as HF ``datasets`` with deterministic train / test splits."""

from asymlora.data.bigbench import BigBenchUnavailableError, ensure_bigbench
from asymlora.data.formats import client_tasks, file_task
from asymlora.data.registry import SUITES, TASKS, get_suite, get_task, list_suites, list_tasks
from asymlora.data.task import (
    KINDS,
    DataFormatError,
    Example,
    Kind,
    PromptTemplate,
    Task,
    UnknownTaskError,
    continuation,
    mc_record,
    split_dataset,
    target_record,
    training_examples,
)

__all__ = [
    "KINDS",
    "SUITES",
    "TASKS",
    "BigBenchUnavailableError",
    "DataFormatError",
    "Example",
    "Kind",
    "PromptTemplate",
    "Task",
    "UnknownTaskError",
    "client_tasks",
    "continuation",
    "ensure_bigbench",
    "file_task",
    "get_suite",
    "get_task",
    "list_suites",
    "list_tasks",
    "mc_record",
    "split_dataset",
    "target_record",
    "training_examples",
]
