"""The processes of a ``torchrun`` job: which one this is, and rank 0 going first.

Under ``torchrun --nproc_per_node N`` every process runs the same command. Rank 0 owns the run
folder (its lock, its checks, everything written there); the other ranks wait until it has claimed
the folder (``rank_zero_first``, ``wait_for_rank_zero``), then train beside it, and write nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import RunFolderError


@dataclass(frozen=True)
class Process:
    """Where this process stands in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


ALONE = Process()  # a process run without torchrun


def init_process() -> Process:
    """Join the torchrun process group if launched by torchrun (gloo on CPU; nccl where there are
    GPUs, each process on the GPU of its ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ALONE
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            torch.cuda.set_device(local)  # "cuda" then means this process's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Process(dist.get_rank(), dist.get_world_size())


@contextmanager
def rank_zero_first(proc: Process) -> Iterator[None]:
    """Around rank 0's preparation (claiming the run folder): when the block ends, the other
    ranks, waiting in ``wait_for_rank_zero``, learn whether it went through."""
    try:
        yield
    except BaseException:
        _tell(proc, ok=False)
        raise
    _tell(proc, ok=True)


def wait_for_rank_zero(proc: Process) -> None:
    """On a rank other than 0: wait until rank 0's ``rank_zero_first`` block has ended; where it
    failed (rank 0 says why), stop with one line instead of waiting forever."""
    if not _tell(proc, ok=None):
        raise RunFolderError(
            f"rank {proc.rank}: rank 0 stopped before training (its error says why)",
            hint="fix what rank 0 reports, then start the torchrun job again",
        )


def _tell(proc: Process, ok: bool | None) -> bool:
    """Rank 0's ``ok``, on every rank."""
    if proc.world_size == 1:
        return bool(ok)
    said = [ok if proc.main else None]
    dist.broadcast_object_list(said, src=0)
    return bool(said[0])
