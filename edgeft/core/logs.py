"""Logging: the library logs, the entry point chooses what reaches the console.

- The library logs to `edgeft.*` loggers (`edgeft/__init__.py` adds one NullHandler and nothing
  else): importing edgeft changes no logger level, handler or environment variable.
- `run_log(dir)` writes a run's `logs/edgeft.log` (every `edgeft.*` record the loggers let through).
- `captured(...)` moves a third-party call's chatter (tf2onnx, onnxslim, ONNX Runtime's calls on the
  root logger, the TFLite converter's C++ lines on file descriptor 2) into `edgeft.external.*` at
  DEBUG: into the log, off the console.
- `console(...)` is for entry points only (the CLI, the search worker): it installs the console
  handler (stdout for information, stderr for warnings), forwards other libraries' records into the
  log, and takes TensorFlow's import-time stderr lines off the console. It returns an undo function.

Loggers: `edgeft.progress` carries per-epoch lines (hidden by --quiet); `edgeft.external.<name>`
other libraries' records (shown by --verbose, and at ERROR). No TensorFlow here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

__all__ = ["LOGGER", "LOG_FILE", "PROGRESS", "EXTERNAL", "get", "run_log", "captured", "diverted", "console"]

LOGGER = "edgeft"
PROGRESS = "edgeft.progress"
EXTERNAL = "edgeft.external"
LOG_FILE = "edgeft.log"   # in a run directory's logs/
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state = {"muted": 0, "early": None}


def get(name: str = "") -> logging.Logger:
    """`get("export")` -> the `edgeft.export` logger."""
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)


# ---------------------------------------------------------------- the run's log file
class _RunFile(logging.FileHandler):
    """A log file made at its first record, with the records held before it written first: a
    command refused before it logs anything (a locked run) leaves the run's files as they were.
    A file that cannot be written drops its records (a log is a record, not the work)."""

    def __init__(self, path: Path, held=()):
        super().__init__(path, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self.held = list(held)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        held, self.held = self.held, []
        try:
            for r in held + [record]:
                super().emit(r)
        except OSError:
            pass

    def handleError(self, record) -> None:   # an unwritable log: the command goes on, silently
        pass


def _file_handler(path: Path, held=()) -> logging.FileHandler:
    return _RunFile(path, held)


@contextlib.contextmanager
def run_log(run_dir: str | Path, name: str = LOG_FILE):
    """While inside: every record of the `edgeft` loggers is appended to RUN/logs/<name>. What an
    entry point logged before (held by `console`) is written first, with the first new record."""
    early = _state["early"]
    held = ()
    if early is not None:   # once: the first run log of the command gets what came before it
        _state["early"] = None
        get().removeHandler(early)
        held = list(early.buffer)
        early.close()
    h = _file_handler(Path(run_dir) / "logs" / name, held)
    get().addHandler(h)
    try:
        yield h
    finally:
        get().removeHandler(h)
        h.close()


@contextlib.contextmanager
def diverted(path: str | Path):
    """Everything edgeft logs inside goes to `path` only (a search candidate's own log); its
    progress output is silenced too. The console keeps the caller's own lines, made outside."""
    from edgeft.core import progress

    path = Path(path)
    h = _file_handler(path)
    get().addHandler(h)
    _state["muted"] += 1
    try:
        with progress.silenced():
            yield h
    finally:
        _state["muted"] -= 1
        get().removeHandler(h)
        h.close()


# ---------------------------------------------------------------- third-party chatter
class _Into(logging.Handler):
    """Re-logs a record under edgeft.external.<its logger>: with `demote`, below ERROR at DEBUG
    (`keep_errors=False`: every record at DEBUG, where the caller reports the errors itself)."""

    def __init__(self, demote: bool = True, keep_errors: bool = True):
        super().__init__()
        self.demote, self.keep_errors = demote, keep_errors

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(LOGGER) or getattr(record, "_edgeft_seen", False):
            return
        copy = logging.makeLogRecord(record.__dict__)
        copy.name, copy._edgeft_seen = f"{EXTERNAL}.{record.name}", True
        if self.demote and (copy.levelno < logging.ERROR or not self.keep_errors):
            copy.levelno, copy.levelname = logging.DEBUG, "DEBUG"
        target = logging.getLogger(EXTERNAL)
        if target.isEnabledFor(copy.levelno):
            target.handle(copy)


class _FromPackages(logging.Filter):
    """On the root logger: takes the records that `packages` log through it (ONNX Runtime's
    quantizer calls `logging.warning` itself) and moves them into edgeft.external."""

    def __init__(self, packages: tuple[str, ...]):
        super().__init__()
        self.dirs = tuple(os.sep + p + os.sep for p in packages)
        self.into = _Into()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and any(d in (record.pathname or "") for d in self.dirs):
            self.into.handle(record)
            return False
        return True


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class _Fd2:
    """The one capture of file descriptor 2 that every thread inside `_fd2_captured` shares: the
    first to enter redirects it, the last to leave restores it (two threads each saving and restoring
    the descriptor would leave it pointing at a closed temporary file)."""
    lock = threading.Lock()
    depth = 0
    saved: int | None = None
    tmp = None
    python_stderr = None


_CONSOLES: dict[tuple[int, int], object] = {}   # (st_dev, st_ino) of fd 2 -> a stream on a copy of it


def _console_stream(saved: int, encoding: str | None):
    """A text stream on a copy of what fd 2 was before the capture: sys.stderr while fd 2 goes to the
    capture's file. Never closed, and one per console file (not one per capture): whatever took it as
    sys.stderr meanwhile (a logging handler made by an import in another thread) can still write."""
    st = os.fstat(saved)
    stream = _CONSOLES.get((st.st_dev, st.st_ino))
    if stream is None or stream.closed:
        stream = os.fdopen(os.dup(saved), "w", buffering=1, encoding=encoding, errors="backslashreplace")
        _CONSOLES[(st.st_dev, st.st_ino)] = stream
    return stream


@contextlib.contextmanager
def _fd2_captured(into: logging.Logger):
    """File descriptor 2 into a temporary file while inside (C++ code writes there, past Python);
    its lines are logged at DEBUG afterwards (by the last thread to leave, when several are inside
    at once: the gate runs files in worker threads beside the converter). The progress ticker, a
    child started before, keeps its own copy of the descriptor and still reaches the terminal."""
    with _Fd2.lock:
        if _Fd2.depth == 0:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError, AttributeError):   # no descriptor 2 (an embedded interpreter)
                saved = None
            if saved is not None:
                _Fd2.saved, _Fd2.tmp, _Fd2.python_stderr = saved, tempfile.TemporaryFile(), sys.stderr
                os.dup2(_Fd2.tmp.fileno(), 2)
                if _fileno(sys.stderr) == 2:   # Python's own writes (progress, warnings) still reach the console
                    sys.stderr = _console_stream(saved, getattr(_Fd2.python_stderr, "encoding", None))
        capturing = _Fd2.saved is not None
        if capturing:
            _Fd2.depth += 1
    if not capturing:
        yield
        return
    try:
        yield
    finally:
        text = ""
        with _Fd2.lock:
            _Fd2.depth -= 1
            if _Fd2.depth == 0:
                if sys.stderr is not _Fd2.python_stderr:   # not closed: another thread (a logging handler
                    sys.stderr.flush()                    # made meanwhile) may hold it; it stays the console
                    sys.stderr = _Fd2.python_stderr
                os.dup2(_Fd2.saved, 2)
                os.close(_Fd2.saved)
                _Fd2.tmp.seek(0)
                text = _Fd2.tmp.read().decode("utf-8", "replace")
                _Fd2.tmp.close()
                _Fd2.saved = _Fd2.tmp = _Fd2.python_stderr = None
        for line in text.splitlines():
            if line.strip():
                into.debug(line)


class _StdoutInto:
    """sys.stdout for a while: what the capturing thread prints goes to `into` (DEBUG), line by line;
    other threads' writes (the console's lines among them) go where sys.stdout went before."""

    def __init__(self, into: logging.Logger, real):
        self.into, self.real, self.owner, self.partial = into, real, threading.get_ident(), ""

    def write(self, text: str) -> int:
        if threading.get_ident() != self.owner:
            return self.real.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.strip():
                self.into.debug(line)
        return len(text)

    def flush(self) -> None:
        if self.partial.strip() and threading.get_ident() == self.owner:
            self.into.debug(self.partial)
            self.partial = ""
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def captured(name: str, loggers: tuple[str, ...] = (), root_from: tuple[str, ...] = (), fd2: bool = False,
             keep_errors: bool = True, stdout: bool = False):
    """A third-party call's chatter into `edgeft.external.<name>` (DEBUG; ERROR and above kept):
    the records of `loggers` (each on its own logger: propagation off and a forwarding handler on,
    both restored), the records packages in `root_from` log through the root logger (a filter on
    it, removed after; a root logger with no handler gets a NullHandler for the while, so that
    `logging.warning()` does not configure it for good), and with fd2 what is written to file
    descriptor 2, and with stdout what this thread prints (ONNX Runtime's calibrators print). Levels are
    never changed. With `--verbose` the console shows all of it.
    keep_errors=False: the loggers' errors too go in at DEBUG (the caller says them in one line)."""
    into = logging.getLogger(f"{EXTERNAL}.{name}")
    with contextlib.ExitStack() as stack:
        for lname in loggers:
            lg, h = logging.getLogger(lname), _Into(keep_errors=keep_errors)
            was = lg.propagate
            lg.propagate = False
            lg.addHandler(h)
            stack.callback(lambda lg=lg, h=h, was=was: (lg.removeHandler(h), setattr(lg, "propagate", was)))
        if root_from:
            root, f = logging.getLogger(), _FromPackages(root_from)
            root.addFilter(f)
            stack.callback(root.removeFilter, f)
            if not root.handlers:
                null = logging.NullHandler()
                root.addHandler(null)
                stack.callback(root.removeHandler, null)
        if fd2 and not _verbose_console():
            stack.enter_context(_fd2_captured(into))
        if stdout and not _verbose_console():
            writer = _StdoutInto(into, sys.stdout)
            stack.enter_context(contextlib.redirect_stdout(writer))
            stack.callback(writer.flush)
        yield


# ---------------------------------------------------------------- entry points only
class _Held(logging.Handler):
    """The last HELD records an entry point logged before any run log was open."""
    HELD = 5000

    def __init__(self):
        import collections

        super().__init__(logging.DEBUG)
        self.buffer = collections.deque(maxlen=self.HELD)

    def emit(self, record: logging.LogRecord) -> None:
        self.buffer.append(record)


class _Console(logging.Handler):
    """stdout for information, stderr (`edgeft: warning: ...`) for warnings and errors; the stream
    looked up at each record (so a redirected sys.stdout is followed)."""

    def __init__(self, quiet: bool, verbose: bool):
        super().__init__(logging.DEBUG)
        self.quiet, self.verbose = quiet, verbose

    def shows(self, record: logging.LogRecord) -> bool:
        name, level = record.name, record.levelno
        if _state["muted"] and level < logging.ERROR:
            return False
        if name.startswith(EXTERNAL):
            return self.verbose or level >= logging.ERROR
        if level < logging.INFO:
            return self.verbose
        if name.startswith(PROGRESS) and level < logging.WARNING:
            from edgeft.core.progress import is_quiet

            return not (self.quiet or is_quiet())
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if not self.shows(record):
            return
        try:
            msg = record.getMessage()
            if record.name.startswith(EXTERNAL):
                line, stream = f"{record.name[len(EXTERNAL) + 1:]}: {record.levelname.lower()}: {msg}", sys.stderr
            elif record.levelno >= logging.ERROR:
                line, stream = f"edgeft: error: {msg}", sys.stderr
            elif record.levelno >= logging.WARNING:
                line, stream = f"edgeft: warning: {msg}", sys.stderr
            else:
                line, stream = msg, sys.stdout
            print(line, file=stream, flush=True)
        except Exception:   # noqa: BLE001 - logging's own rule: a broken stream never breaks the caller
            self.handleError(record)


def _verbose_console() -> bool:
    return any(isinstance(h, _Console) and h.verbose for h in get().handlers)


class _QuietImport:
    """A meta-path finder for `tensorflow` alone: its import runs with file descriptor 2 captured,
    which takes the lines TensorFlow's C++ logs before absl is initialised (TF_CPP_MIN_LOG_LEVEL
    does not reach them: the oneDNN notice, 'Could not find cuda drivers', ...) off the console
    and into the log. Removed from sys.meta_path once used."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        import importlib.machinery

        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CapturingLoader(spec.loader)
        return spec


class _CapturingLoader:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.inner
        with _fd2_captured(logging.getLogger(f"{EXTERNAL}.tensorflow")):
            self.inner.exec_module(module)
            # the platforms' first look for devices logs too ('failed call to cuInit', at ERROR, so
            # TF_CPP_MIN_LOG_LEVEL=2 keeps it): made here, inside the capture, not at the first op.
            # Listing physical devices leaves set_visible_devices / memory growth free to change.
            with contextlib.suppress(Exception):
                module.config.list_physical_devices()


def console(quiet: bool = False, verbose: bool = False):
    """The console of an entry point; returns a function that undoes all of it (for in-process
    calls such as the tests'). Sets, unless the user set them: TF_CPP_MIN_LOG_LEVEL (3: no C++ log
    line at all; --verbose 0) and absl's verbosity, before TensorFlow is imported; the `edgeft`
    logger to DEBUG (the run log takes everything) with the console handler deciding what shows."""
    undo = []
    if verbose or "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        was_env = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
        undo.append(lambda: os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None) if was_env is None
                    else os.environ.__setitem__("TF_CPP_MIN_LOG_LEVEL", was_env))
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        was_absl = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
        undo.append(lambda: absl_logging.set_verbosity(was_absl))
    lg, root = get(), logging.getLogger()
    was_level, was_root = lg.level, root.level
    lg.setLevel(logging.DEBUG)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    # a console already installed (an in-process call inside another) steps aside until restore
    outer = [(lgr, i, h) for lgr in (lg, root) for i, h in enumerate(lgr.handlers)
             if isinstance(h, (_Console, _Into, _Held))]
    for lgr, _, h in outer:
        lgr.removeHandler(h)
    handlers = [(lg, _Console(quiet, verbose)), (root, _Into(demote=False))]
    early = _Held()
    _state["early"] = early
    handlers.append((lg, early))
    for logger, h in handlers:
        logger.addHandler(h)
    finder = None
    if not verbose and "tensorflow" not in sys.modules:
        finder = _QuietImport()
        sys.meta_path.insert(0, finder)
    from edgeft.core import progress

    was_quiet = progress.set_quiet(quiet) if quiet else None

    def restore() -> None:
        for logger, h in handlers:
            logger.removeHandler(h)
        for logger, i, h in outer:   # back where they were
            logger.handlers.insert(i, h)
        if _state["early"] is early:
            _state["early"] = next((h for _, _, h in outer if isinstance(h, _Held)), None)
        early.close()
        if finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(finder)
        lg.setLevel(was_level)
        root.setLevel(was_root)
        if quiet:
            progress.set_quiet(was_quiet)
        for fn in reversed(undo):
            fn()
    return restore
