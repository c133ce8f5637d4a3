"""The project's error types: a problem the user can fix, said in one line with a hint.

Every error a user can cause (a bad config value, flag or file, a run folder in use, a training
that diverged) is raised as an ``AsymloraError`` where the problem is known, with a message that
says what went wrong and, where it helps, a one-line ``hint`` that says how to fix it. The command
line prints such an error as one line and exits with status 2 (``ASYMLORA_DEBUG=1`` or
``--debug`` shows the traceback); any other exception is a bug and keeps its traceback.

The subclasses also derive from the built-in type a caller of the library would expect
(``InputError`` is a ``ValueError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import errno
import math
import re


class AsymloraError(Exception):
    """A problem the user can fix. ``str(err)`` is the message, ``err.hint`` how to fix it ("" if
    the message says it already)."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(AsymloraError, ValueError):
    """A value, flag or file that cannot be used; the message names it."""


class MissingFileError(AsymloraError, FileNotFoundError):
    """A file or folder the user named (or a run folder should hold) is not there."""


class UsageError(InputError):
    """A mistake on the command line (a flag, or a combination of flags)."""


class RunFolderError(AsymloraError, RuntimeError):
    """A run folder that cannot be used as asked: in use by another process, holding another
    run, or a file where a folder is needed."""


class TrainingDivergedError(AsymloraError, RuntimeError):
    """Training produced a non-finite loss or gradient; nothing of that step was kept."""

    hint = "lower train.lr or adapter.alpha, then start again with --overwrite"


def check_at_least(name: str, value: int | float, minimum: int | float) -> int | float:
    """``value`` if it is a finite number >= ``minimum``, else an ``InputError`` naming ``name``."""
    if not (math.isfinite(value) and value >= minimum):
        raise InputError(f"{name}={value} must be at least {minimum}")
    return value


# --- how the command line says it -----------------------------------------------------------------
_FILESYSTEM_HINTS = {
    errno.ENOSPC: "free some disk space (or choose another --out), then run again with --resume",
    errno.EDQUOT: "free some disk space (or choose another --out), then run again with --resume",
    errno.EFBIG: "a file grew past the size limit of this system (ulimit -f); raise it, then --resume",
    errno.EACCES: "choose a folder you may write to (--out), or fix its permissions",
    errno.EPERM: "choose a folder you may write to (--out), or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another folder (--out)",
    errno.ENOTDIR: "a path that must be a folder is a file: choose another path",
    errno.EEXIST: "a path that must be a folder is a file: choose another path",
    errno.EISDIR: "a path that must be a file is a folder: choose another path",
    errno.ENOENT: "check the path",
}


def user_error(err: BaseException) -> tuple[str, str] | None:
    """(message, hint) for an exception the user can fix, None for a bug (which keeps its
    traceback). Project errors, file-system errors (full disk, no permission, a file where a
    folder should be), a missing optional package, running out of memory."""
    if isinstance(err, AsymloraError):
        return str(err), err.hint
    if isinstance(err, OSError) and err.errno is not None:
        where = " ".join(f"{p}" for p in (err.filename, err.filename2) if p is not None)
        message = f"{where}: {err.strerror}" if where else str(err.strerror or err)
        return message, _FILESYSTEM_HINTS.get(err.errno, "")
    if isinstance(err, ImportError):  # an optional package; the message says how to install it
        return str(err), ""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return f"out of memory ({str(err).splitlines()[0] if str(err) else type(err).__name__})", (
            "lower train.batch_size, train.max_length or the adapter's size (adapter.r, adapter.num_experts)"
        )
    return None


def one_line(message: str, hint: str = "") -> str:
    """The message (and hint) on one line: the line breaks of multi-line library messages
    (a YAML parser's, say) become spaces."""
    text = re.sub(r"\s*\n\s*", " ", message.strip())
    return f"{text} (hint: {hint})" if hint else text
