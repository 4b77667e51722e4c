"""The progress rule for blocking steps (edgeft.core.progress.step): a heartbeat naming the step
and its elapsed time, on stderr, in place on a terminal, silenced by --quiet; and the per-step
timings an export records. Fake slow steps (sleeps of a fraction of a second), no TensorFlow."""
from __future__ import annotations

import io
import re
import time

import pytest

from edgeft.core import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _loud(monkeypatch):
    monkeypatch.setattr(progress, "_settings", {"quiet": None})
    monkeypatch.delenv("EDGEFT_QUIET", raising=False)


def test_a_blocking_step_off_a_terminal_prints_its_name_and_elapsed_time_repeatedly():
    log = io.StringIO()
    with progress.recording() as timings:
        with progress.step("export", "converting model_int8.tflite", key="convert tflite_int8", stream=log,
                           interval=0.05):
            time.sleep(0.4)
        with progress.step("export", "fast", stream=log, interval=5.0):
            pass
    lines = log.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert all(re.fullmatch(r"export: converting model_int8\.tflite \.\.\. \d+ s", line) for line in lines), lines
    assert "\r" not in log.getvalue() and "fast" not in log.getvalue()   # a short step says nothing
    assert set(timings.seconds) == {"convert tflite_int8", "fast"}
    assert 0.35 <= timings.seconds["convert tflite_int8"] < 5 and timings.seconds["fast"] < 0.35


def test_only_the_innermost_step_speaks_and_a_terminal_gets_updates_in_place():
    log = io.StringIO()
    with progress.step("export", "gate model_int8.tflite", stream=log, interval=0.05):
        with progress.step("export", "floor model_int8.tflite", stream=log, interval=0.05):
            time.sleep(0.3)
    assert "floor" in log.getvalue() and "gate" not in log.getvalue()
    tty = _Tty()
    with progress.step("export", "converting model.onnx", stream=tty, interval=0.05):
        time.sleep(0.3)
    assert "\rexport: converting model.onnx ... " in tty.getvalue() and "\n" not in tty.getvalue()


def test_quiet_silences_the_heartbeat_but_the_step_is_still_timed():
    progress.set_quiet(True)
    log = io.StringIO()
    with progress.recording() as timings:
        with progress.step("export", "client matrix", stream=log, interval=0.05):
            time.sleep(0.2)
    assert log.getvalue() == "" and timings.seconds["client matrix"] >= 0.15


def test_a_slow_loop_logs_at_least_every_heartbeat_interval(monkeypatch):
    """1,000 items at 11 s each: no 10 % step for 1,100 s, yet a line every item (> HEARTBEAT_S)."""
    clock = iter(range(0, 100000, 11))
    monkeypatch.setattr(progress.time, "time", lambda: float(next(clock)))
    log = io.StringIO()
    bar = progress.Progress("tflm: model_int8.tflite", 1000, "inputs", stream=log)
    for _ in range(5):
        bar.update()
    assert len(log.getvalue().splitlines()) >= 4


def test_a_step_that_holds_the_gil_still_gets_its_heartbeat(tmp_path):
    """The TFLite converter holds the GIL for its whole call, so a thread of ours could not print: with
    the GIL held (a switch interval of 30 s and a busy loop) the lines still come, from the child."""
    import sys

    log_path = tmp_path / "stderr.log"
    old = sys.getswitchinterval()
    with open(log_path, "w") as log:
        try:
            sys.setswitchinterval(30.0)
            with progress.step("export", "converting model_int8.tflite", stream=log, interval=0.1):
                end = time.monotonic() + 0.8
                while time.monotonic() < end:
                    pass
        finally:
            sys.setswitchinterval(old)
    lines = log_path.read_text().splitlines()
    assert len(lines) >= 3, lines
    assert all(re.fullmatch(r"export: converting model_int8\.tflite \.\.\. \d+ s", line) for line in lines), lines
