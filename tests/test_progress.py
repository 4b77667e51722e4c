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
            time.sleep(0.6)
        with progress.step("export", "fast", stream=log, interval=5.0):
            pass
    lines = log.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert all(re.fullmatch(r"export: converting model_int8\.tflite \.\.\. \d+ s", line) for line in lines), lines
    assert "\r" not in log.getvalue() and "fast" not in log.getvalue()   # a short step says nothing
    assert set(timings.seconds) == {"convert tflite_int8", "fast"}
    assert 0.55 <= timings.seconds["convert tflite_int8"] < 5 and timings.seconds["fast"] < 0.35


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


def test_off_a_terminal_a_long_loop_says_so_after_10_s_then_at_most_every_30_s(monkeypatch):
    """1,000 items at 11 s each: its first line at 11 s (past HEARTBEAT_S), then one each 30 s or more."""
    clock = iter(range(0, 100000, 11))
    now = {"t": 0.0}

    def fake():
        now["t"] = float(next(clock))
        return now["t"]

    monkeypatch.setattr(progress.time, "time", fake)
    log = io.StringIO()
    bar = progress.Progress("tflm: model_int8.tflite", 1000, "inputs", stream=log)
    times = []
    for _ in range(10):
        before = len(log.getvalue().splitlines())
        bar.update()
        if len(log.getvalue().splitlines()) > before:
            times.append(now["t"])
    assert times[0] == 11 and len(times) == 4, times
    assert all(b - a >= progress.REPEAT_S for a, b in zip(times, times[1:])), times


def test_off_a_terminal_a_short_loop_prints_nothing_and_its_summary_goes_to_the_log(caplog):
    import logging

    log = io.StringIO()
    with caplog.at_level(logging.DEBUG, logger="edgeft.progress"):
        with progress.Progress("scan", 10, stream=log) as bar:
            bar.update(10)
    assert log.getvalue() == ""
    assert any(r.getMessage().startswith("scan: 10 images in") for r in caplog.records)


def test_on_a_terminal_the_line_moves_while_one_item_takes_long():
    tty = _Tty()
    with progress.Progress("calibrating", 2, stream=tty) as bar:
        time.sleep(1.6)   # no update for 1.6 s: the line is redrawn anyway
        assert "\rcalibrating: [" in tty.getvalue() and "0/2 images" in tty.getvalue()
        bar.update(2)


def test_a_stage_header_comes_before_a_stage_unless_quiet(capsys):
    from edgeft.core import logs

    for quiet in (False, True):
        restore = logs.console(quiet=quiet)
        try:
            progress.stage("stage 2: fine-tuning the top of the backbone, 8 epochs")
        finally:
            restore()
        out = capsys.readouterr().out
        assert (out == "== stage 2: fine-tuning the top of the backbone, 8 epochs\n") != quiet, out


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
                end = time.monotonic() + 1.1   # lines at 0.1 s, then every 0.3 s (the 10 s / 30 s rule, scaled)
                while time.monotonic() < end:
                    pass
        finally:
            sys.setswitchinterval(old)
    lines = log_path.read_text().splitlines()
    assert len(lines) >= 3, lines
    assert all(re.fullmatch(r"export: converting model_int8\.tflite \.\.\. \d+ s", line) for line in lines), lines


def test_off_a_terminal_two_streams_share_the_silence(monkeypatch):
    """A build's bar and the gate's bar in another thread each kept the rule on their own, so a loaded
    export printed a line every ~15 s; a bar now also waits HEARTBEAT_S after another stream's line."""
    wall, mono = {"t": 0.0}, {"t": 1000.0}
    monkeypatch.setattr(progress.time, "time", lambda: wall["t"])
    monkeypatch.setattr(progress.time, "monotonic", lambda: mono["t"])
    log = io.StringIO()
    a = progress.Progress("build", 100, stream=log)
    b = progress.Progress("parity", 100, stream=log)

    def at(t):
        wall["t"], mono["t"] = float(t), 1000.0 + t

    at(11), a.update()                       # a: past 10 s, nobody spoke: a line
    at(12), b.update()                       # b: past 10 s, but a spoke 1 s ago: silent
    at(22), b.update()                       # 11 s after a's line: b's line
    at(25), a.update()                       # a: only 14 s after its own line (REPEAT_S 30): silent
    at(45), a.update()                       # a: 34 s after its line, 23 s after b's: a line
    lines = [line.split(":")[0] for line in log.getvalue().splitlines()]
    assert lines == ["build", "parity", "build"], log.getvalue()
