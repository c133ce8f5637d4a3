"""A checkpoint on request: ``kill -USR1 PID`` (or a batch scheduler's warning before its time
limit, e.g. Slurm's ``--signal=USR1@120``) asks a training process for a checkpoint after its
current step, so that a stop loses nothing. Outside a training loop the signal is noted and
ignored (its default would end the process). No torch here: the CLI installs this at start."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

CHECKPOINT_SIGNAL = getattr(signal, "SIGUSR1", None)  # None where the platform has none (Windows)


@contextmanager
def checkpoint_requests() -> Iterator[Callable[[], bool]]:
    """While the block runs, ``CHECKPOINT_SIGNAL`` asks for a checkpoint: yields a function that
    says (once per signal) whether one was asked for since it was last called. The handler is
    installed only in the main thread and where the platform has the signal (elsewhere nothing
    is ever asked); the previous handler comes back after the block."""
    asked = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    if CHECKPOINT_SIGNAL is None or not main:
        yield lambda: False
        return
    previous = signal.signal(CHECKPOINT_SIGNAL, lambda signum, frame: asked.set())

    def was_asked() -> bool:
        if asked.is_set():
            asked.clear()
            return True
        return False

    try:
        yield was_asked
    finally:
        signal.signal(CHECKPOINT_SIGNAL, previous)


@contextmanager
def checkpoint_requests_noted(command: str) -> Iterator[None]:
    """While a command runs, ``CHECKPOINT_SIGNAL`` outside a training loop (evaluating, loading,
    between a grid's cells) is noted on stderr and ignored, instead of its default, which ends the
    process; ``checkpoint_requests`` takes it over while a loop trains."""
    if CHECKPOINT_SIGNAL is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum, frame) -> None:
        print(f"asymlora {command}: no training step is running (nothing to checkpoint); signal ignored",
              file=sys.stderr)  # fmt: skip

    previous = signal.signal(CHECKPOINT_SIGNAL, note)
    try:
        yield
    finally:
        signal.signal(CHECKPOINT_SIGNAL, previous)
