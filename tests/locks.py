"""A run folder's lock held by another process, as a second worker on a grid holds it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOLD = """
import select, sys
from asymlora.runfolder import folder_lock
with folder_lock(sys.argv[1], log=lambda _: None):
    print("held", flush=True)
    select.select([sys.stdin], [], [], float(sys.argv[2]))
"""


@contextmanager
def held_by_another_process(folder: Path, at_most_s: float = 90) -> Iterator[None]:
    """``folder_lock(folder)`` taken by a child process for the duration of the block, or for
    ``at_most_s`` (so that code which waits for the lock where it should not fails, not hangs)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(at_most_s)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "held"
        yield
    finally:
        child.stdin.close()
        child.wait(30)
