"""Progress of long loops (the scan, the feature cache, calibration, parity): a bar with count,
rate and ETA on a terminal, a plain log line every ~10 % (at most one per 5 s) otherwise, nothing
when quiet (`--quiet`, or EDGEFT_QUIET=1). No TensorFlow here.
"""
from __future__ import annotations

import os
import sys
import threading
import time

_settings = {"quiet": None}   # None: follow EDGEFT_QUIET (read when a bar starts, not at import)


def set_quiet(quiet: bool) -> None:
    """`--quiet`: no progress output from here on (results and errors are still printed)."""
    _settings["quiet"] = bool(quiet)


def is_quiet() -> bool:
    q = _settings["quiet"]
    return os.environ.get("EDGEFT_QUIET", "") not in ("", "0") if q is None else q


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0) + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """`with Progress("scan", 12000, "images") as p: ... p.update(k)`; thread-safe."""

    def __init__(self, label: str, total: int, unit: str = "images", stream=None):
        self.label, self.total, self.unit = label, int(total), unit
        self.stream = stream or sys.stderr
        self.quiet = is_quiet() or self.total <= 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.t0, self._last_step = 0, time.time(), -1
        self._last = self.t0   # no log line in the first seconds: short loops print only their summary
        self._lock = threading.Lock()

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
                    self._last = now
                    self.stream.write("\r" + self.line(now) + "\033[K")
                    self.stream.flush()
                return
            step = int(10 * self.done / self.total)
            if step > self._last_step and now - self._last >= 5.0 and self.done < self.total:
                self._last, self._last_step = now, step
                print(self.line(now), file=self.stream, flush=True)

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
        if self.quiet:
            return
        elapsed = time.time() - self.t0
        if self.tty:
            self.stream.write("\r\033[K")
        if not failed:
            rate = self.done / elapsed if elapsed > 0 else 0.0
            print(f"{self.label}: {self.done} {self.unit} in {elapsed:.1f} s ({rate:,.0f}/s)",
                  file=self.stream, flush=True)
        self.quiet = True
