"""Training: batches of mixed tasks, the loop, checkpoints."""

from .batches import Example, TaskMixer, collate, encode, task_probabilities
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .loop import TrainConfig, train

__all__ = [
    "Example",
    "TaskMixer",
    "TrainConfig",
    "collate",
    "encode",
    "find_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "task_probabilities",
    "train",
]
