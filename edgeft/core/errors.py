"""Errors the user can fix, and operations that failed. The CLI prints their message on one line:
UserError exits with code 2 (bad input, found before any work), ParityError and OperationFailed
with code 1 (the work was done, or began, and failed)."""
from __future__ import annotations

import errno as _errno
import os

__all__ = ["UserError", "ParityError", "OperationFailed", "os_error_text", "os_remedy", "write_failure"]


class UserError(Exception):
    """Bad input (missing folder, bad flag value, unusable weights file...)."""


class ParityError(Exception):
    """An exported model does not agree with the Keras model (CLI exit code 1). `short`: the console's
    line (files and failure codes; the full text is in parity.md and the run's log)."""

    def __init__(self, message: str, short: str | None = None):
        super().__init__(message)
        self.short = short


class OperationFailed(Exception):
    """The work failed part way (a full disk, a file system turned read-only, training diverged to
    NaN, a model file fails its checksum): CLI exit code 1, one line saying what failed and what to do."""


# what to do about the usual reasons a write fails
_REMEDY = {
    _errno.ENOSPC: "free space on that disk (or write elsewhere) and run the command again",
    _errno.EDQUOT: "free space within your disk quota (or write elsewhere) and run the command again",
    _errno.EROFS: "that file system is read-only: write elsewhere, or remount it read-write",
    _errno.EACCES: "you may not write there: fix its permissions or write elsewhere",
    _errno.EPERM: "you may not write there: fix its permissions or write elsewhere",
}


def os_error_text(e: OSError, path=None) -> str:
    """'PATH: No space left on device [ENOSPC]' for an OSError (its own file name if `path` is None)."""
    code = _errno.errorcode.get(e.errno or 0)
    reason = (os.strerror(e.errno) if e.errno else str(e)) + (f" [{code}]" if code else "")
    where = path if path is not None else (e.filename or "")
    return f"{where}: {reason}" if where else reason


def os_remedy(e: OSError) -> str:
    return _REMEDY.get(e.errno or 0, "check the path, its permissions and free space, then run the command again")


def write_failure(e: OSError, path, doing: str = "cannot write") -> OperationFailed:
    """An OperationFailed naming the path, the reason and what to do."""
    return OperationFailed(f"{doing} {os_error_text(e, path)}: {os_remedy(e)}")
