"""A federation's clients' data: the ``clients`` section of ``asymlora federate``'s config and
the examples each client holds. One client per task (as in the paper), or a Dirichlet(alpha)
split of the pooled tasks, where each client holds a skewed mix of tasks and its score is the
mix-weighted average of its model's scores on those tasks' test splits."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

from asymlora.config import ConfigError
from asymlora.data.partition import dirichlet_split
from asymlora.data.registry import SUITES, get_suite, get_tasks
from asymlora.data.task import Example, Task

PARTITIONS = ("task", "dirichlet")


@dataclass
class ClientsConfig:
    suite: str = field(default="fed-nlp", metadata={"help": "a named suite: one client per task"})
    tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "task names or .json/.jsonl files; when given, used instead of the suite"},
    )
    partition: str = field(
        default="task",
        metadata={"help": "task (one task per client) | dirichlet (split of the pooled tasks)"},
    )
    num_clients: int | None = field(default=None, metadata={"help": "dirichlet only: how many clients"})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "dirichlet only: small = more skewed"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/test splits and the partition"})
    max_train_per_task: int | None = field(
        default=None, metadata={"help": "cap on training examples per task"}
    )

    def __post_init__(self) -> None:
        if not self.tasks and self.suite not in SUITES:
            raise ConfigError(f"clients.suite={self.suite!r} is not one of {', '.join(SUITES)}")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"clients.partition={self.partition!r} must be one of {', '.join(PARTITIONS)}")
        if self.partition == "dirichlet" and (self.num_clients is None or self.num_clients < 1):
            raise ConfigError("clients.num_clients must be set (>= 1) for clients.partition='dirichlet'")
        if self.partition == "task" and self.num_clients is not None:
            raise ConfigError(
                "clients.num_clients is for the dirichlet partition; 'task' has one client per task"
            )
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"clients.dirichlet_alpha={self.dirichlet_alpha} must be > 0")
        if self.max_train_per_task is not None and self.max_train_per_task < 1:
            raise ConfigError(f"clients.max_train_per_task={self.max_train_per_task} must be >= 1")

    def task_names(self) -> list[str]:
        return list(self.tasks) if self.tasks else list(SUITES[self.suite])

    def count(self) -> int:
        """The number of clients, known without loading any data."""
        return self.num_clients if self.partition == "dirichlet" else len(self.task_names())


@dataclass
class ClientData:
    """One client's data: the tasks it holds examples of, the share of its training examples
    from each (the weights of its score), and the examples, one list per task."""

    name: str
    tasks: list[Task]
    shares: list[float]
    examples: list[list[Example]]


def build_clients(clients: ClientsConfig) -> list[ClientData]:
    """The federation's clients: one per task, or a Dirichlet split of the pooled tasks."""
    tasks = get_tasks(clients.tasks) if clients.tasks else get_suite(clients.suite)
    pools = [t.train_examples(clients.split_seed, clients.max_train_per_task) for t in tasks]
    if clients.partition == "task":  # one client per task, named after it (names are unique)
        return [ClientData(t.name, [t], [1.0], [p]) for t, p in zip(tasks, pools, strict=True)]
    labels = [t for t, pool in enumerate(pools) for _ in pool]
    flat = [ex for pool in pools for ex in pool]
    parts = dirichlet_split(labels, clients.num_clients, clients.dirichlet_alpha, clients.split_seed)
    out = []
    for i, indices in enumerate(parts):
        held = sorted({labels[j] for j in indices})
        examples = [
            [replace(flat[j], task_id=k) for j in indices if labels[j] == t] for k, t in enumerate(held)
        ]
        shares = [len(e) / len(indices) for e in examples]
        out.append(ClientData(f"client-{i}", [tasks[t] for t in held], shares, examples))
    return out


def clients_digest(clients: list[ClientData]) -> str:
    """A digest of every client's training examples, in order (with its name and task shares).
    A federation's checkpoint records it, so that a resume after the data changed (a task file
    edited, another split) is refused instead of mixing rounds trained on two datasets."""
    digest = hashlib.sha256()
    for c in clients:
        examples = [[[e.prompt, e.target, e.task_id] for e in task] for task in c.examples]
        digest.update(json.dumps([c.name, c.shares, examples]).encode() + b"\n")
    return digest.hexdigest()[:16]
