"""The Run object (a run directory opened once), progress output and loading model.keras."""
import io
import sys

import numpy as np
import pytest

from conftest import REPO, run_cli
from edgeft.core import progress, rundir
from edgeft.core.config import build_config, to_yaml
from edgeft.core.errors import UserError
from edgeft.run import Run, as_run, run_splits


def test_only_a_finished_run_opens(tmp_path):
    with pytest.raises(UserError, match="not an edgeft run directory"):
        Run.open(tmp_path)
    (tmp_path / rundir.CONFIG).write_text(to_yaml(build_config({"image_size": 32})))
    with pytest.raises(UserError, match="not a finished edgeft run"):
        Run.open(tmp_path)
    r = run_cli("export", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgeft: error:") and "not a finished" in r.stderr


def test_a_demo_run_reuses_its_stored_folder(tmp_path, image_folder, monkeypatch):
    from edgeft import run as run_module

    cfg = build_config({"image_size": 32})          # no folder: a demo run's config
    assert cfg.data.folder is None
    (tmp_path / rundir.CONFIG).write_text(to_yaml(cfg))
    (tmp_path / rundir.MODEL).write_bytes(b"not opened here")
    rundir.write_json(tmp_path / rundir.DATA_REPORT, {"folder": str(image_folder)})
    calls = []
    monkeypatch.setattr(run_module, "data_folder", lambda c: calls.append(c) or str(image_folder))
    assert Run.open(tmp_path).folder == str(image_folder) and calls == []
    # the stored folder is gone (a cleaned cache): the demo set-up runs again, once
    rundir.write_json(tmp_path / rundir.DATA_REPORT, {"folder": str(tmp_path / "gone")})
    run = Run.open(tmp_path)
    assert run.folder == str(image_folder) and run.folder == str(image_folder) and len(calls) == 1


def test_a_run_is_opened_once_and_carries_its_splits_and_model(trained_run, monkeypatch):
    from edgeft.data import cache

    # every later command reads the run's images from the image cache finetune filled: no decoding
    monkeypatch.setattr(cache, "decode_image", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
    run = Run.open(trained_run.run_dir)
    assert run.model is run.model and run.splits is run.splits
    again = run_splits(run.cfg, run.path)
    assert run.splits.train.paths == again.train.paths and run.splits.val.paths == again.val.paths
    assert np.array_equal(run.splits.val.x, again.val.x)
    # flags on top of the config keep what the data settings did not change
    other = as_run(run, build_config({"parity_inputs": 300}, base=run.cfg))
    assert other.splits is run.splits and other.cfg.parity.parity_inputs == 300
    moved = as_run(run, build_config({"val_split": 0.5}, base=run.cfg))
    assert moved._splits is None


def test_model_keras_loads_with_edgeft_load_model_and_plain_tf_keras(trained_run, tmp_path):
    import subprocess

    path = trained_run.run_dir / rundir.MODEL
    code = ("import sys, numpy as np, tf_keras, edgeft\n"
            "a = edgeft.load_model(sys.argv[1])\n"
            "b = tf_keras.models.load_model(sys.argv[1], compile=False)\n"
            "x = np.full((2, 32, 32, 3), 100.0, np.float32)\n"
            "assert np.allclose(a.predict_on_batch(x), b.predict_on_batch(x), atol=1e-6)\n"
            "print('loaded', a.name, b.name)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
    # without registering edgeft's layer, plain tf_keras cannot load it: what the README warns about
    bare = subprocess.run([sys.executable, "-c", "import sys, tf_keras; tf_keras.models.load_model(sys.argv[1])",
                           str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bare.returncode != 0


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_log_lines_otherwise_nothing_when_quiet(monkeypatch):
    monkeypatch.setattr(progress, "_settings", {"quiet": None})
    monkeypatch.delenv("EDGEFT_QUIET", raising=False)
    clock = iter(range(0, 1000, 2))
    monkeypatch.setattr(progress.time, "time", lambda: float(next(clock)))
    tty = _Tty()
    with progress.Progress("scan", 10, stream=tty) as bar:
        for _ in range(10):
            bar.update()
    text = tty.getvalue()
    assert "\r" in text and "[####" in text and "10/10 images" in text and "ETA" in text and "/s" in text
    log = io.StringIO()
    progress._last_line[0] = 0.0   # the terminal's summary just now is another stream's line (tests/test_progress.py)
    with progress.Progress("scan", 10, stream=log) as bar:
        for _ in range(10):
            bar.update()
    lines = log.getvalue().splitlines()   # 2 s an item: one line past 10 s, none 30 s after; the summary:
    assert "\r" not in log.getvalue() and len(lines) == 1 and "ETA" in lines[0]   # in the log (test_progress)
    progress.set_quiet(True)
    quiet = io.StringIO()
    with progress.Progress("scan", 10, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_quiet_flag_reaches_progress(monkeypatch, tmp_path):
    from edgeft.cli import app as cli

    monkeypatch.setattr(progress, "_settings", {"quiet": None})
    monkeypatch.delenv("EDGEFT_QUIET", raising=False)
    assert not progress.is_quiet()
    seen = []
    monkeypatch.setattr(cli.deploy if hasattr(cli, "deploy") else __import__("edgeft.cli.deploy").cli.deploy,
                        "cmd_parity", lambda args: seen.append(progress.is_quiet()) or 0)
    assert cli.main(["parity", str(tmp_path / "missing"), "--quiet"]) == 0
    assert seen == [True] and not progress.is_quiet()   # during the command, and not after it
