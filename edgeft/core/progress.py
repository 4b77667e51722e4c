"""Progress output, one rule everywhere: it goes to stderr; on a terminal it updates in place, at
least every HEARTBEAT_S; off a terminal a step (a loop or one blocking call) that runs past
HEARTBEAT_S prints one line, repeated at most every REPEAT_S, and a shorter step prints nothing
(its summary goes to the run's log); a stage header (`stage`) comes before each stage. `--quiet`
(or EDGEFT_QUIET=1) silences it. Results and errors are not progress: they are printed by whoever
has them. No TensorFlow here.

- `Progress`: a loop with a count (the scan, the feature cache, calibration, parity): bar, rate, ETA.
- `step`: one blocking call that cannot report (a converter, a child process): a background thread
  names the step and its elapsed time (`export: converting model_int8.tflite ... 20 s`) every
  HEARTBEAT_S while no other progress line was printed, and the step's wall time goes to every
  `recording()` in force (the per-step timings an export writes to export/timings.json).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

_settings = {"quiet": None}   # None: follow EDGEFT_QUIET (read when a bar starts, not at import)

HEARTBEAT_S = 10.0   # a step this long says so (off a terminal: one line; on one: in place, refreshed this often)
REPEAT_S = 30.0      # off a terminal, a long step's line comes again at most this often
_log = logging.getLogger("edgeft.progress")
_last_line = [0.0]   # time.monotonic() of the last progress line any bar or step printed
_last_by: list = [None]   # the bar (Progress / Lines) that printed it; None: a step's heartbeat
_active: list["step"] = []    # steps running now, innermost last (only it speaks)
_recorders: list["Timings"] = []
_lock = threading.Lock()


def _note_line(by=None) -> None:
    now = time.monotonic()
    shown, _last_line[0] = _last_line[0], now
    _last_by[0] = by
    if _Ticker.current is not None and now - shown >= 0.5:   # the child learns of it (at most twice a second)
        _Ticker.current.show()


def _others_quiet(me) -> bool:
    """Off a terminal, a bar speaks only after HEARTBEAT_S without another stream's line (a build's
    heartbeat and the gate's bar in its thread): one line per 10 s at most, each stream's own per 30 s."""
    return _last_by[0] is me or time.monotonic() - _last_line[0] >= HEARTBEAT_S


def set_quiet(quiet: bool | None) -> bool | None:
    """`--quiet`: no progress output from here on (results and errors are still printed); None:
    follow EDGEFT_QUIET again. Returns the setting it replaced."""
    was, _settings["quiet"] = _settings["quiet"], None if quiet is None else bool(quiet)
    return was


class silenced:
    """`with silenced(): ...`: no progress output inside (a search candidate's, kept in its log)."""

    def __enter__(self) -> "silenced":
        self.was = set_quiet(True)
        return self

    def __exit__(self, *exc) -> None:
        set_quiet(self.was)


def is_quiet() -> bool:
    q = _settings["quiet"]
    return os.environ.get("EDGEFT_QUIET", "") not in ("", "0") if q is None else q


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0) + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def stage(text: str) -> None:
    """The header before a stage (`== stage 2: fine-tuning ...`): on the console unless --quiet,
    and in the run's log."""
    logging.getLogger("edgeft.progress.stages").info(f"== {text}")


class Progress:
    """`with Progress("scan", 12000, "images") as p: ... p.update(k)`; thread-safe."""

    def __init__(self, label: str, total: int, unit: str = "images", stream=None):
        self.label, self.total, self.unit = label, int(total), unit
        self._stream = stream   # None: sys.stderr as it is at each write (a capture of fd 2 swaps it for a while)
        self.quiet = is_quiet() or self.total <= 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.t0, self.closed = 0, time.time(), False
        self._last = self.t0   # off a terminal: no line before HEARTBEAT_S
        self._lock = threading.Lock()
        self._stop, self._drawn = threading.Event(), time.monotonic()
        if self.tty and not self.quiet:   # in place: the elapsed time moves even while one item takes long
            threading.Thread(target=self._refresh, name="edgeft-progress", daemon=True).start()

    def _refresh(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if not self.quiet and not self.closed and time.monotonic() - self._drawn >= 1.0:
                    self._drawn = time.monotonic()
                    self._write("\r" + self.line() + "\033[K")

    @property
    def stream(self):
        return self._stream or sys.stderr

    def _write(self, text: str) -> None:
        """Progress is best effort: a stream closed under it (a worker thread's bar while another
        thread's capture of fd 2 ends) loses the line, never the work."""
        try:
            stream = self.stream
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self.quiet:
                return
            now = time.time()
            if self.tty:
                if now - self._last >= 0.1 or self.done >= self.total:
                    self._last, self._drawn = now, time.monotonic()
                    self._write("\r" + self.line(now) + "\033[K")
                return
            # off a terminal: nothing in the first HEARTBEAT_S, then a line at most every REPEAT_S
            wait = HEARTBEAT_S if self._last == self.t0 else REPEAT_S
            if self.done < self.total and now - self._last >= wait and _others_quiet(self):
                self._last = now
                self._write(self.line(now) + "\n")
                _note_line(self)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.time()) - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * min(self.done, self.total) / self.total)
        bar = f"[{'#' * filled}{'.' * (width - filled)}] " if self.tty else ""
        return (f"{self.label}: {bar}{self.done}/{self.total} {self.unit}, {rate:,.0f}/s, "
                f"elapsed {_clock(elapsed)}, ETA {_clock(eta)}")

    def close(self, failed: bool = False) -> None:
        """The summary (`scan: 12000 images in 41.0 s (293/s)`): in the run's log always, on the
        console only on a terminal (where it replaces the bar) after a step that ran past HEARTBEAT_S;
        off a terminal the step's one line per REPEAT_S said enough (issue 29: 25 lines in all)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._stop.set()
        elapsed = time.time() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        summary = f"{self.label}: {self.done} {self.unit} in {elapsed:.1f} s ({rate:,.0f}/s)"
        if not failed:
            _log.debug(summary)
        if self.quiet:
            return
        if self.tty:
            self._write("\r\033[K")
        if self.tty and not failed and elapsed >= HEARTBEAT_S:
            self._write(summary + "\n")
            _note_line()
        self.quiet = True


class Lines:
    """A loop whose items each end in a finished line (an epoch's: `stage 2: epoch 3/8 - 12 s - loss
    ...`), by the one rule: on a terminal each line replaces the last in place (cleared by `close`);
    off a terminal nothing in the first HEARTBEAT_S, then a line at most every REPEAT_S; nothing when
    quiet. The caller logs every line to the run's log itself."""

    def __init__(self, stream=None):
        self._stream = stream
        self.quiet = is_quiet()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self._last = time.time()
        self.shown = False

    stream = Progress.stream
    _write = Progress._write

    def show(self, line: str) -> None:
        if self.quiet:
            return
        now = time.time()
        if self.tty:
            self._write("\r" + line + "\033[K")
            self.shown = True
            return
        wait = HEARTBEAT_S if self._last == self.t0 else REPEAT_S
        if now - self._last >= wait and _others_quiet(self):
            self._last = now
            self._write(line + "\n")
            _note_line(self)

    def close(self) -> None:
        if self.tty and self.shown:
            self._write("\r\033[K")
        self.shown = False


class Timings:
    """Wall seconds per named step, in the order the steps first ran (a step run twice adds up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        with _lock:
            self.seconds[key] = self.seconds.get(key, 0.0) + float(seconds)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


class recording:
    """`with recording() as t: ...`: every `step` inside (any thread, any depth) adds its time to t."""

    def __enter__(self) -> Timings:
        self.timings = Timings()
        _recorders.append(self.timings)
        return self.timings

    def __exit__(self, *exc) -> None:
        _recorders.remove(self.timings)


def record(key: str, seconds: float) -> None:
    """Adds a time measured some other way (e.g. calibration inside a converter) to every recording."""
    for r in list(_recorders):
        r.add(key, seconds)


class step:
    """`with step("export", "converting model_int8.tflite", key="convert tflite_int8"): blocking()`.

    Off a terminal: a line `export: converting model_int8.tflite ... 20 s` each `interval` seconds
    in which no other progress line was printed (counted from the outermost running step); on a
    terminal the same text updated in place each second; nothing when quiet. The innermost running
    step is the one named. The ticking runs in a child process (edgeft/core/ticker.py) when the
    stream is a file, so that a call holding the GIL (the TFLite converter) cannot silence it; in a
    thread otherwise (an in-memory stream). `key` (default: `what`) names the step's wall time in
    every `recording()` in force.
    """

    def __init__(self, prefix: str, what: str, key: str | None = None, stream=None, interval: float = HEARTBEAT_S,
                 repeat: float | None = None):
        self.label, self.key = f"{prefix}: {what}", key or what
        self._stream = stream   # None: sys.stderr as it is at each write (see Progress)
        self.interval = float(interval)
        self.repeat = float(repeat) if repeat is not None else self.interval * REPEAT_S / HEARTBEAT_S
        self.quiet = is_quiet()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.seconds = 0.0
        self._ticker = self._thread = None

    stream = Progress.stream

    def __enter__(self) -> "step":
        self.t0, self.wall0 = time.monotonic(), time.time()
        self._stop = threading.Event()
        with _lock:
            _active.append(self)
            outermost = len(_active) == 1
        if self.quiet:
            return self
        if outermost:
            self._ticker = _Ticker.start(self.stream, self.interval, self.tty, self.repeat)
        if _Ticker.current is not None:
            _Ticker.current.show()
        elif self._ticker is None:
            self._thread = threading.Thread(target=self._beat, name="edgeft-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.monotonic() - self.t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _lock:
            if self in _active:
                _active.remove(self)
        if self._ticker is not None:
            self._ticker.close()
        elif _Ticker.current is not None:
            _Ticker.current.show()
        record(self.key, self.seconds)

    def _beat(self) -> None:
        tick = min(1.0, self.interval / 2) if self.tty else min(0.5, self.interval / 4)
        shown, lines = False, 0
        while not self._stop.wait(tick):
            now = time.monotonic()
            with _lock:
                innermost = bool(_active) and _active[-1] is self
                outer_t0 = _active[0].t0 if _active else self.t0   # silence counts from the outermost step
            if not innermost:
                continue
            elapsed = now - self.t0
            if self.tty:
                if elapsed >= min(1.0, self.interval):
                    Progress._write(self, f"\r{self.label} ... {elapsed:.0f} s\033[K")
                    shown = True
            elif now - max(outer_t0, _last_line[0]) >= (self.repeat if lines else self.interval) - tick:
                Progress._write(self, f"{self.label} ... {elapsed:.0f} s\n")   # within the wait
                lines += 1
                _note_line()
        if shown:
            Progress._write(self, "\r\033[K")


class _Ticker:
    """The child process that ticks for the outermost step and all steps inside it (ticker.py)."""
    current: "_Ticker | None" = None

    @classmethod
    def start(cls, stream, interval: float, tty: bool, repeat: float) -> "_Ticker | None":
        import subprocess
        import tempfile

        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            return None   # an in-memory stream: the thread ticks
        stream.flush()
        tmp = tempfile.NamedTemporaryFile("w", prefix="edgeft-tick-", delete=False)
        tmp.close()
        self = cls()
        self.path = tmp.name
        self.show()
        try:
            self.proc = subprocess.Popen([sys.executable, "-S", os.path.join(os.path.dirname(__file__), "ticker.py"),
                                          self.path, str(fd), str(interval), "1" if tty else "0", str(repeat)],
                                         stdin=subprocess.PIPE, pass_fds=(fd,), close_fds=True)
        except OSError:
            os.unlink(self.path)
            return None
        cls.current = self
        return self

    def show(self) -> None:
        """Tells the child the innermost step, its start and the last progress line (atomically)."""
        with _lock:
            if not _active:
                return
            outer, inner = _active[0], _active[-1]
            text = f"{outer.wall0}\t{time.time() - (time.monotonic() - _last_line[0])}\t{inner.wall0}\t{inner.label}"
        tmp = f"{self.path}.{threading.get_ident()}"
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def close(self) -> None:
        _Ticker.current = None
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:   # noqa: BLE001 - a ticker that will not stop is killed, never an export's error
            self.proc.kill()
        try:
            os.unlink(self.path)
        except OSError:
            pass
