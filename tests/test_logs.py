"""Logging done right (issue 29, item 3): the library logs to `edgeft.*` with only a NullHandler;
importing it changes no logger, level or environment variable; the command line chooses what the
console shows (--quiet / --verbose), and what it keeps off the console goes to the run's log."""
from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

STATE = textwrap.dedent('''
    import logging, os, sys
    def state():
        root = logging.getLogger()
        out = {"env": dict(os.environ), "root_level": root.level,
               "root_handlers": [type(h).__name__ for h in root.handlers],
               "logger_class": logging.getLoggerClass().__name__,
               "levels": {n: lg.level for n, lg in logging.root.manager.loggerDict.items()
                          if isinstance(lg, logging.Logger) and not n.startswith("edgeft")}}
        if "tensorflow" in sys.modules:
            import absl.logging
            out["tf_level"] = logging.getLogger("tensorflow").level
            out["absl"] = absl.logging.get_verbosity()
        return out
    def diff(a, b):
        env = {k for k in set(a["env"]) | set(b["env"]) if a["env"].get(k) != b["env"].get(k)}
        levels = {k for k in set(a["levels"]) & set(b["levels"]) if a["levels"][k] != b["levels"][k]}
        rest = {k for k in a if k not in ("env", "levels") and a.get(k) != b.get(k)}
        return sorted(env), sorted(levels), sorted(rest)
''')

IMPORTS = STATE + textwrap.dedent('''
    import importlib, json, pkgutil
    before = state()
    import edgeft
    plain = diff(before, state())
    tf_free = "tensorflow" not in sys.modules
    handlers = [type(h).__name__ for h in logging.getLogger("edgeft").handlers]
    # TensorFlow and tfmot first: they set variables of their own (TF2_BEHAVIOR, KMP_* through
    # scikit-learn); TF_USE_LEGACY_KERAS is set by the caller, the one variable edgeft/_keras.py
    # needs before TensorFlow loads
    import tensorflow, tf_keras, tensorflow_model_optimization
    before = state()
    names = [m.name for m in pkgutil.walk_packages(edgeft.__path__, "edgeft.") if not m.name.endswith("__main__")]
    for name in names:
        importlib.import_module(name)
    print(json.dumps({"plain": plain, "tf_free": tf_free, "handlers": handlers, "all": diff(before, state()),
                      "modules": len(names),
                      "edgeft_handlers": [type(h).__name__ for h in logging.getLogger("edgeft").handlers]}))
''')


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_importing_edgeft_and_every_module_changes_no_logging_state_or_environment():
    r = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=300,
                       env=_clean_env(TF_USE_LEGACY_KERAS="1"), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["plain"] == [[], [], []], got["plain"]   # `import edgeft`: nothing at all
    assert got["tf_free"]
    assert got["handlers"] == ["NullHandler"]
    assert got["modules"] > 60
    assert got["all"] == [[], [], []], got["all"]   # env, third-party logger levels, root/TF/absl levels
    assert got["edgeft_handlers"] == ["NullHandler"]


def _fake_command(monkeypatch, seen: dict):
    """`edgeft finetune` replaced by a command that logs one record of each kind."""
    import absl.logging

    from edgeft.cli import app

    def cmd(args):
        seen["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
        seen["absl"] = absl.logging.get_verbosity()
        logging.getLogger("edgeft.train.stages").info("a result line")
        logging.getLogger("edgeft.progress.epochs").debug("stage 1: epoch 1/2 - 1 s - loss 0.5")
        logging.getLogger("edgeft.train.stages").debug("a debug line")
        logging.getLogger("edgeft.data.datasets").warning("a warning")
        logging.getLogger("tensorflow").warning("a TensorFlow warning")
        logging.getLogger("tf2onnx.tfonnx").info("a tf2onnx line")
        return 0

    monkeypatch.setattr(app, "cmd_finetune", cmd)


@pytest.mark.parametrize("flag", ["", "--quiet", "--verbose"])
def test_quiet_and_verbose_choose_what_the_console_shows(monkeypatch, capsys, flag):
    from edgeft.cli.app import main

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    seen = {}
    _fake_command(monkeypatch, seen)
    root = logging.getLogger()
    before = (root.level, list(root.handlers), list(logging.getLogger("edgeft").handlers))
    assert main(["finetune"] + ([flag] if flag else [])) == 0
    out, err = capsys.readouterr()
    assert "a result line" in out and "edgeft: warning: a warning" in err
    assert ("stage 1: epoch 1/2" in out) == (flag == "--verbose")   # the console's epoch lines: progress.Lines
    assert ("a debug line" in out) == (flag == "--verbose")
    assert ("a TensorFlow warning" in err) == (flag == "--verbose")
    assert ("a tf2onnx line" in err) == (flag == "--verbose")
    assert seen["TF_CPP_MIN_LOG_LEVEL"] == ("0" if flag == "--verbose" else "3")
    import absl.logging

    assert seen["absl"] == (absl.logging.INFO if flag == "--verbose" else absl.logging.ERROR)
    # the command line's choices end with the call (in-process callers, the tests)
    assert (root.level, list(root.handlers), list(logging.getLogger("edgeft").handlers)) == before
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ


def test_a_user_set_tf_log_level_is_kept(monkeypatch):
    from edgeft.cli.app import main

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    seen = {}
    _fake_command(monkeypatch, seen)
    assert main(["finetune"]) == 0
    assert seen["TF_CPP_MIN_LOG_LEVEL"] == "1"


def test_the_run_log_holds_what_came_before_it_and_everything_the_console_hides(tmp_path, capsys):
    from edgeft.core import logs

    restore = logs.console(quiet=True)
    try:
        logging.getLogger("edgeft.train.stages").info("before the run directory existed")
        with logs.run_log(tmp_path / "run"):
            logging.getLogger("edgeft.progress.epochs").info("stage 2: epoch 1/1")
            logging.getLogger("edgeft.train.stages").debug("a debug line")
            logging.getLogger("tensorflow").warning("a third-party warning")
        logging.getLogger("edgeft.train.stages").info("after the run log closed")
    finally:
        restore()
    text = (tmp_path / "run" / "logs" / logs.LOG_FILE).read_text()
    for line in ("before the run directory existed", "stage 2: epoch 1/1", "a debug line", "a third-party warning"):
        assert line in text
    assert "after the run log closed" not in text
    out, err = capsys.readouterr()
    assert "stage 2: epoch" not in out and "a debug line" not in out and "third-party" not in err


def test_a_search_candidate_is_diverted_to_its_own_log_without_redirecting_stdout(tmp_path, capsys):
    from edgeft.core import logs

    from edgeft.core import progress

    with logs.diverted(tmp_path / "logs" / "c1.log"):
        logging.getLogger("edgeft.train.stages").info("candidate line")
        assert progress.is_quiet()
        with progress.Progress("inner", 3) as bar:
            bar.update(3)
    logging.getLogger("edgeft.search.work").info("search line")
    out, err = capsys.readouterr()
    assert "candidate line" not in out and "inner" not in err and "search line" in out
    assert "candidate line" in (tmp_path / "logs" / "c1.log").read_text()
    for path in (REPO / "edgeft").rglob("*.py"):   # edgeft's own output goes through logging; the one
        text = path.read_text()                     # redirect: logs.captured(stdout=True), for a third party's
        if path.name == "logs.py":                  # print (ONNX Runtime's calibrators), this thread's only
            text = text.replace("contextlib.redirect_stdout(writer)", "")
        assert "redirect_stdout" not in text and "redirect_stderr" not in text, path


def test_every_keras_fit_leaves_the_epoch_line_to_edgefts_logger():
    """Keras' own epoch lines bypass logging (and --quiet): every fit runs with verbose=0."""
    def verbose_of(keywords, dicts):
        for k in keywords:
            if k.arg == "verbose":
                return getattr(k.value, "value", None)
            if k.arg is None and isinstance(k.value, ast.Name):   # fit(**kw), kw = dict(..., verbose=0)
                return dicts.get(k.value.id)
        return None

    fits = []
    for path in (REPO / "edgeft").rglob("*.py"):
        tree = ast.parse(path.read_text())
        dicts = {n.targets[0].id: verbose_of(n.value.keywords, {}) for n in ast.walk(tree)
                 if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and isinstance(n.value, ast.Call)
                 and getattr(n.value.func, "id", None) == "dict"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "fit":
                fits.append((path.name, node.lineno, verbose_of(node.keywords, dicts)))
    assert len(fits) >= 4 and all(v == 0 for _, _, v in fits), fits


def test_epoch_lines_go_to_the_log_and_reach_the_console_by_the_progress_rule(tmp_path, capsys, monkeypatch):
    """Issue 29 items 1-2: every epoch line is in the run log; off a terminal the console gets one only
    in a stage past HEARTBEAT_S, then at most every REPEAT_S (a 15-epoch stage of 1-s epochs printed
    15 lines, and the demo's console 53); --quiet: none."""
    from edgeft.core import logs, progress

    import numpy as np

    from edgeft._keras import keras
    from edgeft.train.callbacks import EpochLog

    model = keras.Sequential([keras.layers.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1])

    def fit(quiet: bool) -> str:
        restore = logs.console(quiet=quiet)
        try:
            with logs.run_log(tmp_path / "run"):
                model.fit(x, y, epochs=3, verbose=0, callbacks=[EpochLog(tmp_path, "head")])
        finally:
            restore()
        cap = capsys.readouterr()
        return cap.out + cap.err

    assert "epoch" not in fit(False)   # a short stage: nothing on the console
    log = (tmp_path / "run" / "logs" / logs.LOG_FILE).read_text()
    assert all(f"stage 1: epoch {n}/3" in log for n in (1, 2, 3))
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)   # as if each epoch took past the heartbeat ...
    monkeypatch.setattr(progress, "REPEAT_S", 3600.0)   # ... and the repeat were far off
    shown = [line for line in fit(False).splitlines() if ": epoch " in line]
    assert [line.split(" - ")[0] for line in shown] == ["stage 1: epoch 1/3"]
    assert ": epoch " not in fit(True)


def _fake_onnxruntime_module(tmp_path):
    """A module whose file lies under an `onnxruntime` folder and calls `logging.warning` itself,
    as ONNX Runtime's quantizer does."""
    import importlib.util

    src = tmp_path / "onnxruntime" / "fake_quantizer.py"
    src.parent.mkdir()
    src.write_text("import logging\n\ndef quantize():\n    logging.warning('Axis 1 is out-of-range')\n"
                   "    return logging.getLogger().level\n")
    spec = importlib.util.spec_from_file_location("fake_quantizer", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_onnx_runtime_warnings_go_to_the_log_without_touching_the_root_logger(tmp_path, monkeypatch, capsys):
    """ONNX Runtime's quantizer logs through the root logger; edgeft takes its records off the
    console with a filter, never by raising the root logger's level (which silenced everyone's)."""
    from edgeft.core import logs

    import onnx
    import onnxruntime.quantization as q
    from onnx import TensorProto, helper

    from edgeft.export import keras2onnx

    fake = _fake_onnxruntime_module(tmp_path)
    seen = {}

    def quantize_static(src, dst, reader, **kw):
        seen["root_level"] = fake.quantize()
        Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(q, "quantize_static", quantize_static)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], [0.1] * 6)
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["probs"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 2, 2, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    with logs.run_log(tmp_path / "run"):
        keras2onnx.onnx_int8_bytes(model.SerializeToString(), __import__("numpy").zeros((1, 2, 2, 3), "float32"), {})
    assert seen["root_level"] == level   # unchanged while ONNX Runtime ran
    assert (root.level, list(root.handlers)) == (level, handlers)
    assert "out-of-range" not in capsys.readouterr().err
    assert "Axis 1 is out-of-range" in (tmp_path / "run" / "logs" / logs.LOG_FILE).read_text()
    assert onnx.load_from_string  # (onnx imported for the model above)


CONSOLE = textwrap.dedent('''
    import sys
    import numpy as np
    from edgeft.core import logs
    restore = logs.console()
    with logs.run_log(sys.argv[1]):
        from edgeft._keras import keras, tf
        from edgeft.export import keras2tflite
        from edgeft.nn.runtime import TFLiteRunner
        tf.config.list_physical_devices()
        m = keras.Sequential([keras.layers.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])
        data = keras2tflite.tflite_int8(m, np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype("float32"))
        open(sys.argv[1] + "/m.tflite", "wb").write(data)
        TFLiteRunner(sys.argv[1] + "/m.tflite").predict(np.zeros((1, 8, 8, 3), np.float32))
        with logs.captured("test", fd2=True):
            print("python's own stderr", file=sys.stderr)   # passes; only native writes are captured
    restore()
    print("done")
''')


@pytest.mark.slow
def test_the_console_has_no_tensorflow_or_converter_lines_and_the_log_has_them(tmp_path):
    """TensorFlow's import-time C++ lines (oneDNN, CUDA drivers, cuInit) and the converter's
    (`fully_quantize: 0, ...`) reach neither stream; the converter's are in the run's log."""
    from edgeft.core import logs

    r = subprocess.run([sys.executable, "-c", CONSOLE, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env=_clean_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    console = r.stdout + r.stderr
    for noise in ("absl::InitializeLog", "I0000", "E0000", "W0000", "cuInit", "oneDNN", "fully_quantize", "XNNPACK"):
        assert noise not in console, console[-3000:]
    assert r.stdout.strip() == "done", r.stdout[-3000:]
    # Python's own stderr still reaches the console while file descriptor 2 is captured
    assert r.stderr.strip() == "python's own stderr", r.stderr[-3000:]
    assert "fully_quantize" in (tmp_path / "logs" / logs.LOG_FILE).read_text()


def test_a_run_log_that_receives_nothing_leaves_the_run_as_it_was(tmp_path):
    """A command refused before it logs anything (a locked run) must not add logs/edgeft.log."""
    from edgeft.core import logs

    restore = logs.console()
    try:
        logging.getLogger("edgeft.progress.stages").info("== export: held until the log has a record")
        with logs.run_log(tmp_path / "run"):
            pass
        assert not (tmp_path / "run").exists()
    finally:
        restore()


def test_first_device_lookup_logs_nothing_on_the_console_even_at_tf_log_level_2():
    """A search worker inherits the user's TF_CPP_MIN_LOG_LEVEL; at 2 TensorFlow's ERROR lines pass, and
    the platforms' first device lookup (at the first op, after the import) printed 'failed call to cuInit'
    (146 columns) on machines with CUDA libraries and no GPU. The lookup is made inside the import's
    capture: the line goes to the log. (On a machine whose lookup says nothing this passes either way.)"""
    code = ("from edgeft.core import logs; logs.console()\n"
            "import tensorflow as tf\n"
            "tf.constant(1) + 1\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=_clean_env(TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1"), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok"
    assert r.stderr.strip() == "", r.stderr[-2000:]


def test_a_captured_call_prints_into_the_log_and_other_threads_still_reach_the_console(capsys, caplog):
    """ONNX Runtime's histogram calibrators print ('Collecting tensor data and making histogram ...');
    inside `captured(..., stdout=True)` that goes to the log, while another thread's line does not."""
    import threading

    from edgeft.core import logs

    restore = logs.console()
    try:
        with caplog.at_level(logging.DEBUG, logger="edgeft"), logs.captured("onnxruntime", stdout=True):
            print("Collecting tensor data and making histogram ...")
            t = threading.Thread(target=lambda: print("another thread's line"))
            t.start(), t.join()
    finally:
        restore()
    out = capsys.readouterr().out
    assert "Collecting tensor data" not in out and "another thread's line" in out
    assert any("Collecting tensor data" in r.getMessage() for r in caplog.records)
