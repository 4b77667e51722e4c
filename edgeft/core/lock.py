"""One writer per run directory: an advisory lock on RUN/.edgeft.lock.

Every command that writes a run (finetune, finetune --resume, qat, export, parity, benchmark,
evaluate with --out inside a run) holds `run_lock(run, command)` while it works. A second one on
the same run is refused at once with one line naming the command and PID that hold it (exit 2),
instead of both writing and one silently losing the other's files.

The lock is fcntl.flock on an open file: the kernel drops it when its process ends, however it
ends (kill -9 included), so a stale lock file never blocks anyone; the JSON inside it (command,
PID, start time) is only there to name the holder. Within one process the lock is re-entrant
(finetune runs qat, export runs the parity gate). Where fcntl is missing (Windows) no lock is
taken. Imports no TensorFlow.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from edgeft.core.errors import UserError

try:
    import fcntl
except ImportError:   # pragma: no cover - not on Linux / macOS
    fcntl = None

LOCK_FILE = ".edgeft.lock"
_held: dict[tuple[int, int], int] = {}   # (device, inode) of a lock file this process holds -> depth


class RunLocked(UserError):
    """Another edgeft command is writing this run directory (exit 2)."""


def holder(run: str | os.PathLike) -> dict | None:
    """What the lock file says about its holder (None when there is none to read)."""
    try:
        return json.loads((Path(run) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None


def enclosing_run(path: str | os.PathLike) -> Path | None:
    """The edgeft run directory that `path` is in or under (RUN/export/eval_x/ is in RUN), if any."""
    from edgeft.core.rundir import CONFIG, LABELS

    p = Path(os.path.abspath(path))
    for d in (p, *p.parents):   # config.yaml and labels.txt: what finetune writes first
        if (d / CONFIG).is_file() and (d / LABELS).is_file():
            return d
    return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another edgeft command"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
    host = info.get("host")
    where = "" if not host or host == socket.gethostname() else f" on {host}"
    return f"`edgeft {info.get('command', '?')}` (PID {info.get('pid', '?')}{where}, since {since})"


@contextmanager
def run_lock(run: str | os.PathLike, command: str, create: bool = True):
    """Holds the run's lock for the block; raises RunLocked at once when another process holds it.

    create=False only probes a run that has a lock file (one that never had one has no holder):
    the run directory is left exactly as it was."""
    run = Path(run)
    if fcntl is None or (not create and not (run / LOCK_FILE).is_file()):
        yield
        return
    try:
        f = open(run / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"cannot lock {run}: {os.strerror(e.errno) if e.errno else e} "
                        f"({run / LOCK_FILE}): check the run directory exists and is writable") from None
    try:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino)   # the file, not its name: a run replaced by --overwrite is a new one
        if key in _held:   # re-entrant within one process
            _held[key] += 1
            try:
                yield
            finally:
                _held[key] -= 1
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{run} is in use by {_describe(holder(run))}: wait for it to finish (or stop it), "
                            f"then run `edgeft {command}` again") from None
        try:   # name the holder; a reader may catch it half-written and then says "another command"
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"command": command, "pid": os.getpid(), "started": time.time(),
                                "host": socket.gethostname()}) + "\n")
            f.flush()
        except OSError:
            pass   # a full disk must not stop the lock itself from working
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        f.close()   # closing the last descriptor drops the flock (re-entrant opens close their own)
