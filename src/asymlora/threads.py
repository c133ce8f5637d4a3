"""How many CPU threads torch uses, chosen once per process and printed.

torch takes one thread per core by default. On a busy machine two threads per process spin-wait
against other work (a SmolLM2 step measured 4 s idle and 30 s under load with 2 threads on 2 cores),
so runs that share a machine should use one each. ``--threads`` on the command line wins over
``train.threads`` in a config; 0 keeps torch's default."""

from __future__ import annotations

import os

import torch

_from_command_line: int | None = None


def choose_threads(n: int | None) -> None:
    """The ``--threads`` flag: applied now, and wins over any config's ``train.threads`` later."""
    global _from_command_line
    if n is None:
        return
    _from_command_line = n
    if n:
        torch.set_num_threads(n)


def use_threads(configured: int = 0, log=print) -> int:
    """Apply ``configured`` (unless ``--threads`` was given) and print the thread count in use."""
    n = _from_command_line if _from_command_line is not None else configured
    if n:
        torch.set_num_threads(n)
    used = torch.get_num_threads()
    log(f"torch threads: {used} (of {os.cpu_count()} cores; set with --threads or train.threads)")
    return used
