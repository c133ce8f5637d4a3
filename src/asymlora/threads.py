"""How many CPU threads torch uses, chosen once per process and printed.

torch takes one thread per core by default. On a busy machine two threads per process spin-wait
against other work (a SmolLM2 step measured 4 s idle and 30 s under load with 2 threads on 2 cores),
so runs that share a machine should use one each. ``--threads`` on the command line wins over
``train.threads`` in a config; 0 keeps torch's default."""

from __future__ import annotations

import os

from .errors import UsageError

_from_command_line: int | None = None


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_threads(n: int, flag: str = "--threads") -> None:
    """Refuse a thread count below 0 or above the cores (more threads than cores only spin-wait)."""
    if not 0 <= n <= cores():
        raise UsageError(f"{flag} {n}: give 0 (one per core) up to {cores()}, the cores of this machine")


def choose_threads(n: int | None) -> None:
    """The ``--threads`` flag: applied now, and wins over any config's ``train.threads`` later."""
    global _from_command_line
    if n is None:
        return
    _from_command_line = n
    if n:
        import torch  # here, not at the top: the command line imports this module before any command

        torch.set_num_threads(n)


def use_threads(configured: int = 0, log=print) -> int:
    """Apply ``configured`` (unless ``--threads`` was given) and print the thread count in use."""
    import torch

    n = _from_command_line if _from_command_line is not None else configured
    if n > cores():  # a config written on a larger machine (a resumed run, a shared config)
        log(f"train.threads={n}, but this machine has {cores()} cores: using {cores()}")
        n = cores()
    if n:
        torch.set_num_threads(n)
    used = torch.get_num_threads()
    log(f"torch threads: {used} (of {os.cpu_count()} cores; set with --threads or train.threads)")
    return used
