"""Issue 26 item 6: the gate's runs start as each file is written (edgeft/verify/prefetch.py), and the
outputs the gate judges are exactly what its own sequential run gives; fd 2 captured from several
threads at once is restored."""
import os
import threading

import numpy as np
import pytest

from edgeft.core.formats import FORMATS
from edgeft.verify.prefetch import GatePrefetch

FMT = {f.name: f for f in FORMATS}


@pytest.fixture(scope="module")
def parity_x(exported_run):
    from edgeft.core.config import from_yaml_file
    from edgeft.data.datasets import gate_inputs
    from edgeft.run import run_splits

    run, _ = exported_run
    cfg = from_yaml_file(run / "config.yaml")
    splits = run_splits(cfg)
    return run, gate_inputs(splits.val, cfg).x[:40], splits


def test_prefetched_outputs_equal_the_gates_own_run(parity_x):
    from edgeft.verify.evaluate import test_accuracy_of_file
    from edgeft.verify.runners import open_format_runner

    run, x, splits = parity_x
    export = run / "export"
    pre = GatePrefetch(x, splits)
    names = ("tflite_float", "tflite_int8", "onnx_float", "onnx_int8")
    for name in names:
        pre.add(FMT[name], export / FMT[name].filename)
    pre.add(FMT["tflm_int8"], export / FMT["tflm_int8"].filename)   # not run: judged on LiteRT's outputs
    for name in names:
        fmt = FMT[name]
        got = pre.take(fmt, export / fmt.filename)
        want = open_format_runner(fmt, export / fmt.filename).predict(x)   # the gate's own runner, default threads
        assert got is not None and np.array_equal(got, want), name
        known, metrics = pre.test_accuracy(fmt.filename)
        assert known and metrics["accuracy"] == test_accuracy_of_file(export / fmt.filename, splits)["accuracy"]
    assert pre.take(FMT["tflm_int8"], export / "model_int8.tflite") is None   # taken already, or never queued
    assert pre.take(FMT["tflite_fp16"], export / "model_fp16.tflite") is None
    assert pre.test_accuracy("model_fp16.tflite") == (False, None)
    # outputs already computed (the int8 choice's) are taken as given, not run again
    fake = np.full((len(x), 3), 0.25, np.float32)
    pre.add(FMT["tflite_int8"], export / "model_int8.tflite", probs=fake)
    assert pre.take(FMT["tflite_int8"], export / "model_int8.tflite") is fake
    pre.close()


def test_an_error_in_a_prefetched_run_is_raised_where_the_gate_takes_it(tmp_path):
    from edgeft.core.errors import UserError

    bad = tmp_path / "model_float.tflite"
    bad.write_bytes(b"not a flatbuffer")
    pre = GatePrefetch(np.zeros((2, 8, 8, 3), np.float32))
    pre.add(FMT["tflite_float"], bad)
    with pytest.raises(UserError):
        pre.take(FMT["tflite_float"], bad)
    pre.close()


def test_fd2_captured_from_two_threads_at_once_is_restored():
    """Two threads inside `_fd2_captured` together (the converter in the main thread, a gate run
    opening LiteRT in a worker), the first in leaving first: descriptor 2 is still captured for the
    other, then points where it pointed before (each thread saving and restoring it on its own left
    it on the first thread's closed temporary file)."""
    import logging

    from edgeft.core.logs import _fd2_captured

    before = os.fstat(2)
    a_in, b_in, a_go, b_go, a_out = (threading.Event() for _ in range(5))
    errors = []

    def inside(me_in, wait_for, go):
        try:
            if wait_for is not None:
                wait_for.wait(5)
            with _fd2_captured(logging.getLogger("edgeft.external.test")):
                me_in.set()
                os.write(2, b"chatter from C++\n")
                go.wait(5)
        except Exception as e:   # noqa: BLE001
            errors.append(e)

    a = threading.Thread(target=inside, args=(a_in, None, a_go))
    b = threading.Thread(target=inside, args=(b_in, a_in, b_go))
    a.start(), b.start()
    assert b_in.wait(5)
    a_go.set()
    a.join(5)                                   # the first in leaves first
    assert os.fstat(2).st_ino != before.st_ino   # still captured for b
    b_go.set()
    b.join(5)
    after = os.fstat(2)
    assert not errors and (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)


def test_a_bar_made_during_another_threads_capture_still_writes_after_it(monkeypatch, capfd):
    """A gate run's progress bar made in a worker while the main thread's capture of fd 2 has
    sys.stderr swapped: once the capture ends, the bar's next line goes to the console (it raised
    "I/O operation on closed file" from the worker, which failed the export, on the 224-px run)."""
    import logging

    from edgeft.core import progress
    from edgeft.core.logs import _fd2_captured

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(progress, "REPEAT_S", 0.0)
    monkeypatch.setattr(progress, "is_quiet", lambda: False)
    import sys

    monkeypatch.setattr(sys, "stderr", open(2, "w", closefd=False))   # Python's stderr on fd 2, as in a CLI run
    with _fd2_captured(logging.getLogger("edgeft.external.test")):
        bar = progress.Progress("parity: model.tflite (litert)", 3, "inputs")
    bar.update(1)            # after the capture ended: the swapped stream is closed by now
    bar.update(1)
    bar.close()
    assert "parity: model.tflite (litert): " in capfd.readouterr().err


def test_a_handler_made_during_a_capture_still_writes_after_it(monkeypatch, capfd):
    """A library that makes its logging handler (bound to sys.stderr as it is) while another thread's
    capture of fd 2 has sys.stderr swapped, and logs after the capture: the line reaches the console
    (the swapped stream was closed at the capture's end: "onnx_float export failed: I/O operation on
    closed file" on the 224-px export, tf2onnx imported beside a gate run)."""
    import logging
    import sys

    from edgeft.core.logs import _fd2_captured

    monkeypatch.setattr(sys, "stderr", open(2, "w", closefd=False))
    with _fd2_captured(logging.getLogger("edgeft.external.test")):
        handler = logging.StreamHandler()   # takes sys.stderr now: the capture's stand-in
    handler.emit(logging.LogRecord("lib", logging.WARNING, __file__, 1, "a library's line", None, None))
    assert "a library's line" in capfd.readouterr().err
