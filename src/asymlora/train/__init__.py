"""Training: batches of mixed tasks, the loop, checkpoints."""

from .batches import Example, TaskMixer, collate, encode, task_probabilities
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .loop import TrainConfig, encode_tasks, local_train, optimizer_step, pad_id_of, train

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
    "encode_tasks",
    "local_train",
    "optimizer_step",
    "pad_id_of",
    "train",
]
