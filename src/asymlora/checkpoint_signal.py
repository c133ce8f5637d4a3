"""A checkpoint on request: ``kill -USR1 PID`` (or a batch scheduler's warning before its time
limit, e.g. Slurm's ``--signal=USR1@120``) asks a training process for a checkpoint after its
current step, so that a stop loses nothing. Outside a training loop the signal is noted and
ignored (its default would end the process). Under torchrun, signal rank 0's worker, not the
launcher (which has no handler for it). No torch here: the CLI installs this at start."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

CHECKPOINT_SIGNAL = getattr(signal, "SIGUSR1", None)  # None where the platform has none (Windows)


@contextmanager
def checkpoint_requests() -> Iterator[Callable[[], bool]]:
    """While the block runs, ``CHECKPOINT_SIGNAL`` asks for a checkpoint: yields a function that
    says whether one was asked for since it was last called (signals that come together count as
    one request). Nothing is ever asked outside the main thread or where the platform has no such
    signal. The handler only counts (no lock, no I/O): it may run between any two bytecodes."""
    counts = {"signals": 0, "answered": 0}

    def count(signum, frame) -> None:
        counts["signals"] += 1

    def was_asked() -> bool:
        signals = counts["signals"]  # one read: a signal after it is answered at the next call
        if signals == counts["answered"]:
            return False
        counts["answered"] = signals
        return True

    with _handled(count):
        yield was_asked


@contextmanager
def checkpoint_requests_noted(command: str) -> Iterator[None]:
    """While a command runs, ``CHECKPOINT_SIGNAL`` outside a training loop (evaluating, loading,
    between a grid's cells) is noted on stderr and ignored, instead of its default, which ends the
    process; ``checkpoint_requests`` takes it over while a loop trains."""
    message = f"asymlora {command}: no training step is running (nothing to checkpoint); signal ignored\n"

    def note(signum, frame) -> None:  # os.write, not print: the signal may come inside a print
        os.write(2, message.encode())

    with _handled(note):
        yield


@contextmanager
def _handled(handler: Callable) -> Iterator[None]:
    """``handler`` for ``CHECKPOINT_SIGNAL`` while the block runs, the previous one back after it;
    nothing is installed outside the main thread (Python allows handlers only there) or where the
    platform has no such signal."""
    if CHECKPOINT_SIGNAL is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(CHECKPOINT_SIGNAL, handler)
    try:
        yield
    finally:
        signal.signal(CHECKPOINT_SIGNAL, previous)
