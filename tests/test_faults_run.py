"""Faults around the run directory: two writers at once, full disks, read-only places, hostile
image files and golden files. Each test's docstring starts with "expected: ..." (what edgeft
promises in that case); `python tools/bench_faults.py` runs every `faults` test and prints them as
a table. Disks fill up and directories turn read-only by fault injection (the tests run as root,
where permission bits stop nothing), and, where the machine lets us mount a tmpfs, for real.
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli, write_digit_folder
from edgeft.core import rundir
from edgeft.core.errors import OperationFailed, ParityError, UserError
from edgeft.core.lock import LOCK_FILE, RunLocked, holder, run_lock

pytestmark = pytest.mark.faults


# ------------------------------------------------------------------ fault injection
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path, root: Path) -> bool:
    try:
        return Path(os.path.abspath(os.fspath(path))).is_relative_to(root)
    except TypeError:   # a file descriptor, not a path
        return False


def make_read_only(monkeypatch, root: Path, code: int = errno.EROFS) -> None:
    """Everything under `root` behaves as on a read-only file system (or, code=EACCES, as a
    directory we may not write): creating, opening for writing, renaming and removing fail."""
    root = Path(os.path.abspath(root))
    real_open, real_os_open = builtins.open, os.open
    real = {name: getattr(os, name) for name in ("mkdir", "replace", "rename", "unlink", "rmdir")}

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if _under(file, root) and any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if _under(path, root) and flags & _WRITE_FLAGS:
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(name):
        def f(path, *args, **kwargs):
            if _under(path, root) or (args and isinstance(args[0], (str, os.PathLike)) and _under(args[0], root)):
                fail(path)
            return real[name](path, *args, **kwargs)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name in real:
        monkeypatch.setattr(os, name, guard(name))


class _FullFile:
    """A file whose writes fail as on a full disk (the file itself is opened for real)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk_for(monkeypatch, match) -> None:
    """Writes to files whose path `match(path)` accepts fail with ENOSPC (open succeeds)."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and match(Path(file)):
            return _FullFile(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK_FILE))
    return dst


# a lock holder in another process: takes the lock, says so, keeps it until its stdin closes
_HOLDER = ("import sys; from edgeft.core.lock import run_lock\n"
           "with run_lock(sys.argv[1], sys.argv[2]):\n"
           "    print('locked', flush=True); sys.stdin.read()\n")


class LockHolder:
    def __init__(self, run: Path, command: str = "export"):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run), command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "locked"
        self.pid = self.proc.pid

    def release(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.release()


# ------------------------------------------------------------------ item 1: one writer per run
def test_second_writer_is_refused_naming_the_holder(tmp_path):
    """expected: while one process holds a run's lock, a second is refused at once (RunLocked, exit 2) with one
    line naming the command and PID that hold it; the lock goes when its holder ends (even by SIGKILL)."""
    run = tmp_path / "run"
    run.mkdir()
    with LockHolder(run, "export") as other:
        with pytest.raises(RunLocked) as e:
            with run_lock(run, "qat"):
                pass
        msg = str(e.value)
        assert "`edgeft export`" in msg and f"PID {other.pid}" in msg and "\n" not in msg
        assert holder(run)["pid"] == other.pid
        other.proc.kill()   # the kernel drops a flock with its process: no stale lock
        other.proc.wait(timeout=30)
    with run_lock(run, "qat"):
        with run_lock(run, "parity"):   # re-entrant within one process (export runs the gate)
            assert holder(run)["command"] == "qat"


def test_every_writing_command_is_refused_while_the_run_is_locked(trained_run, tmp_path, image_folder, capsys):
    """expected: finetune --resume, finetune --overwrite, qat, export, parity, benchmark and evaluate --out inside
    the run are all refused (exit 2) while another process holds the run's lock; none writes anything."""
    from edgeft.cli import app as cli
    from edgeft.verify.bench import benchmark
    from edgeft.verify.evaluate import evaluate
    from edgeft.pipeline.exporter import export
    from edgeft.quantize.qat import run_qat
    from edgeft.pipeline.orchestrator import finetune

    run = copy_run(trained_run.run_dir, tmp_path / "run")
    (run / "state.json").write_text("{}")   # so that --resume has something to resume
    (run / "report.md").unlink()   # and an unfinished run: a finished one resumes to "already finished", writing nothing
    with LockHolder(run, "export") as other:
        before = sorted(p.name for p in run.iterdir())
        for call in (lambda: finetune(out=run, resume=True),
                     lambda: finetune({"folder": str(image_folder), "image_size": 32}, out=run, overwrite=True),
                     lambda: run_qat(run, epochs=1), lambda: export(run, tflite=["float"]),
                     lambda: benchmark(run), lambda: evaluate(run / "model.keras", image_folder)):
            with pytest.raises(RunLocked, match=f"PID {other.pid}"):
                call()
        for argv in (["parity", str(run)], ["export", str(run)], ["qat", str(run)]):
            assert cli.main(argv) == 2
            assert f"PID {other.pid}" in one_error_line(capsys.readouterr().err)
        assert sorted(p.name for p in run.iterdir()) == before


def test_second_export_no_longer_removes_the_first_ones_staging(trained_run, tmp_path):
    """expected: a second `edgeft export` while one is building is refused before it touches anything: the
    first export's .export-staging-PID/ (the files it has built so far) stays intact (before the lock, the second
    export deleted it as a leftover and the first shipped only what it built after that)."""
    from edgeft.pipeline.exporter import export, open_staging

    run = copy_run(trained_run.run_dir, tmp_path / "run")
    with LockHolder(run, "export") as first:
        staging = run / f".export-staging-{first.pid}"   # what the first export has built so far
        staging.mkdir()
        (staging / "model_float.tflite").write_bytes(b"built by the first export")
        with pytest.raises(RunLocked):
            export(run, onnx=["float"])
        assert (staging / "model_float.tflite").read_bytes() == b"built by the first export"
    # the mechanism of the reported loss: open_staging removes every other staging directory
    open_staging(run)
    assert not staging.exists()


def test_export_cli_refuses_while_the_run_is_locked(trained_run, tmp_path):
    """expected: `edgeft export RUN` while another process holds RUN's lock: exit 2, one line naming the holder's
    command and PID, and nothing written (no export/, no staging directory)."""
    run = copy_run(trained_run.run_dir, tmp_path / "run")
    with LockHolder(run, "finetune --resume") as other:
        r = run_cli("export", run, "--tflite", "float", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("edgeft")]   # TensorFlow logs its own lines
    assert "`edgeft finetune --resume`" in line and f"PID {other.pid}" in line
    assert not (run / "export").exists() and not list(run.glob(".export-*"))


def _resaved_model(run: Path) -> None:
    """model.keras replaced by a new save of the same model (other bytes: a retrained run)."""
    from edgeft.nn.model import load_model

    model = load_model(run / "model.keras")
    with rundir.atomic_path(run / "model.keras", suffix=".keras") as tmp:
        model.save(str(tmp))


def test_partial_export_sets_aside_files_of_an_earlier_model(exported_run, tmp_path):
    """expected: a partial export after model.keras changed ships only what it rebuilt; every other file goes to
    export/failed/ with its reason in failed/stale.json, and the new manifest does not list it."""
    from edgeft.core.config import build_config, from_yaml_file
    from edgeft.pipeline.exporter import export
    from edgeft.export.manifest import check_manifest, sha256_file

    src, _ = exported_run
    run = copy_run(src, tmp_path / "run")
    old = rundir.read_json(run / "export" / "manifest.json")["files"]
    assert len(old) > 1 and "model_float.tflite" in old
    _resaved_model(run)
    assert sha256_file(run / "model.keras") != rundir.read_json(run / "export" / "manifest.json")["model_keras_sha256"]
    cfg = build_config({"parity_inputs": 100, "client_inputs": 0}, base=from_yaml_file(run / "config.yaml"))
    export(run, tflite=["float"], cfg=cfg)
    out = run / "export"
    man = rundir.read_json(out / "manifest.json")
    assert set(man["files"]) == {"model_float.tflite"}
    stale = rundir.read_json(out / "failed" / "stale.json")
    assert set(stale) == set(old) - {"model_float.tflite"}
    assert all("earlier model.keras" in v["reason"] for v in stale.values())
    for name in stale:
        assert (out / "failed" / name).is_file() and not (out / name).exists()
    assert check_manifest(run, out) == []
    assert not list(run.glob(".export-*"))


def test_partial_export_keeps_files_of_the_current_model(exported_run, tmp_path):
    """expected: files not rebuilt are kept when the manifest shows they came from the current model.keras (and
    QAT weights); a QAT-made int8 file goes to failed/ once the QAT weights change, and a file edited by hand too."""
    from edgeft.pipeline.exporter import open_staging, set_aside_stale

    src, _ = exported_run
    run = copy_run(src, tmp_path / "run")
    names = set(rundir.read_json(run / "export" / "manifest.json")["files"])
    stage = open_staging(run)
    assert set_aside_stale(run, stage, {"model.onnx"}) == {}
    man = rundir.read_json(stage / "manifest.json")
    man["files"]["model_int8.tflite"]["int8_source"] = "qat"   # as when QAT's file shipped
    rundir.write_json(stage / "manifest.json", man)
    assert man["qat_weights_sha256"] and (run / rundir.QAT_WEIGHTS).is_file()
    with open(run / rundir.QAT_WEIGHTS, "ab") as f:   # QAT run again: other weights
        f.write(b"\0")
    with open(stage / "model_fp16.tflite", "ab") as f:
        f.write(b"\0")
    stale = set_aside_stale(run, stage, {"model.onnx"})
    assert stale == {"model_int8.tflite": "made from an earlier QAT model",
                     "model_fp16.tflite": "changed after export (sha256 differs from manifest.json)"}
    left = {p.name for p in stage.iterdir()}
    assert names - set(stale) <= left and not (set(stale) & left)
    shutil.rmtree(stage)


# ------------------------------------------------------------------ item 11: nothing passes the gate
def test_export_with_nothing_passing_reports_the_gate(trained_run, tmp_path):
    """expected: when every requested file fails the gate, export raises the parity failure (exit 1), not
    "golden vectors: no exported files given" (exit 2); the file is in export/failed/, no staging dir is left."""
    from edgeft.core.config import build_config, from_yaml_file
    from edgeft.pipeline.exporter import export

    run = copy_run(trained_run.run_dir, tmp_path / "run")
    cfg = build_config({"float_atol": 1e-12, "parity_inputs": 100, "client_inputs": 0},
                       base=from_yaml_file(run / "config.yaml"))
    with pytest.raises(ParityError, match="nothing passed the gate") as e:
        export(run, tflite=["float"], cfg=cfg)
    assert "model_float.tflite" in str(e.value) and "golden" not in str(e.value)
    out = run / "export"
    assert (out / "failed" / "model_float.tflite").is_file() and not (out / "model_float.tflite").exists()
    assert rundir.read_json(out / "manifest.json")["files"] == {} and not (out / "golden").exists()
    assert not list(run.glob(".export-*"))


def test_tflm_without_a_passing_int8_file_says_so(trained_run, tmp_path, monkeypatch):
    """expected: `export --tflite int8 --tflm` whose int8 file fails the gate exits 1 saying --tflm had no passing
    int8 file; the TFLM sources go to failed/ with it and no staging dir is left (converters stubbed: cheap)."""
    from types import SimpleNamespace

    import edgeft.pipeline.exporter as ex
    import edgeft.verify.parity
    import edgeft.export.tflm
    from edgeft.core.config import build_config, from_yaml_file

    run = copy_run(trained_run.run_dir, tmp_path / "run")

    def fake_int8(ctx, fmt):   # the int8 choice (both int8 rows build from it)
        ctx.cache["int8_chosen"] = SimpleNamespace(source="ptq", floor=None, probs=None,
                                                 judgement=SimpleNamespace(floor=None))
        ctx.made_from[fmt.name] = "ptq"
        return b"int8 bytes"

    def fake_tflm(model, out, labels):
        out.mkdir()
        (out / "model_data.cc").write_text("// sources")
        return {"flash_bytes": 1, "arena_bytes": 1}

    def fake_gate(handle, formats, qat_model, inputs, out, floors=None, **kw):
        rows = [{"file": f.filename, "format": f.name, "passed": False, "failures": ["int8 tier"]} for f in formats]
        rundir.write_json(out / rundir.PARITY_JSON, {"rows": rows})
        raise ParityError("tflite_int8 failed its int8 tier; tflm_int8 failed its int8 tier")

    monkeypatch.setattr(ex.ExportContext, "int8_tflite", fake_int8)
    monkeypatch.setattr(ex, "write_int8_reports", lambda *a, **k: None)   # the per-layer report: tests/test_int8_report.py
    monkeypatch.setattr(edgeft.export.tflm, "write_tflm", fake_tflm)
    monkeypatch.setattr(edgeft.verify.parity, "check_parity", fake_gate)
    monkeypatch.setattr(ex, "report_headline_accuracy", lambda *a, **k: None)
    cfg = build_config({"int8_source": "ptq", "parity_inputs": 100, "client_inputs": 0, "int8_recover": "off"},
                       base=from_yaml_file(run / "config.yaml"))
    with pytest.raises(ParityError, match="--tflm: no passing int8 TFLite file"):
        ex.export(run, tflite=["int8"], tflm=True, cfg=cfg)
    out = run / "export"
    assert (out / "failed" / "tflm" / "model_data.cc").is_file() and not (out / "tflm").exists()
    assert not list(run.glob(".export-*"))


# ------------------------------------------------------------------ item 9: one line, not a traceback
def test_full_disk_while_exporting_is_one_line_and_cleans_up(trained_run, tmp_path, monkeypatch, capsys):
    """expected: ENOSPC while export writes a file: exit 1, one line naming the file, the reason (ENOSPC) and what
    to do; the .export-staging-PID directory is removed and the previous export/ (none here) is unchanged."""
    from edgeft.cli import app as cli

    run = copy_run(trained_run.run_dir, tmp_path / "run")
    # the first file export writes into its staging directory (failing there spares the test a conversion;
    # every run file goes through the same atomic write)
    fill_disk_for(monkeypatch, lambda p: p.name.startswith(".labels.txt.") and p.parent.name.startswith(".export-"))
    assert cli.main(["export", str(run), "--tflite", "float", "--parity-inputs", "100", "--client-inputs", "0"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "labels.txt" in line and "ENOSPC" in line and "free space" in line and "left as it was" in line
    assert not list(run.glob(".export-*")) and not (run / "export").exists()
    assert not [p for p in run.rglob(".labels.txt.*")]


def test_full_disk_while_decoding_is_one_line(tmp_path, monkeypatch, capsys):
    """expected: ENOSPC while the image cache is written (decoding a folder for finetune): exit 1, one line naming
    the cache and what to do; no half-made cache entry and no run directory are left."""
    from edgeft.cli import app as cli

    folder = write_digit_folder(tmp_path / "digits", per_class=4)
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEFT_CACHE", str(cache))

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "run"
    assert cli.main(["finetune", str(folder), "--out", str(out), "--image-size", "32", "--backbone", "mobilenet_v2",
                     "--weights", "none"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "ENOSPC" in line and str(cache) in line and "EDGEFT_CACHE" in line
    assert not list((cache / "images").glob(".build-*")) and not out.exists()


def test_read_only_cache_is_one_line_and_still_serves_its_entries(tmp_path, monkeypatch):
    """expected: a read-only image cache that needs a new entry: UserError (exit 2) naming the cache and
    EDGEFT_CACHE; an entry already in it is still read (the pointer it cannot update is only a hint)."""
    from edgeft.data.datasets import scan_folder

    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEFT_CACHE", str(cache))
    a = write_digit_folder(tmp_path / "a", per_class=3)
    b = write_digit_folder(tmp_path / "b", per_class=3, seed=1)
    built = scan_folder(str(a), 32)
    (cache / "images" / "folders").rename(cache / "images" / "old-folders")   # no pointer: it must write one
    make_read_only(monkeypatch, cache)
    again = scan_folder(str(a), 32)
    assert np.array_equal(again.read(np.arange(len(again))), built.read(np.arange(len(built))))
    with pytest.raises(UserError, match="not writable.*EDGEFT_CACHE") as e:
        scan_folder(str(b), 32)
    assert "Read-only file system" in str(e.value) and str(b) in str(e.value)


def test_unwritable_out_for_finetune_is_refused_before_training(image_folder, tmp_path, monkeypatch, capsys):
    """expected: finetune --out in a directory that cannot be written: exit 2 at once, one line naming --out and
    what to do; nothing decoded or trained first."""
    import edgeft.train.stages
    from edgeft.cli import app as cli

    monkeypatch.setattr(edgeft.train.stages, "load_splits", lambda *a, **k: pytest.fail("decoded before the check"))
    ro = tmp_path / "ro"
    ro.mkdir()
    make_read_only(monkeypatch, ro, errno.EACCES)
    assert cli.main(["finetune", str(image_folder), "--out", str(ro / "run"),
                     "--image-size", "32", "--backbone", "mobilenet_v2", "--weights", "none"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--out" in line and "not writable" in line and "EACCES" in line


def test_unwritable_run_for_export_is_refused_before_work(trained_run, tmp_path, monkeypatch, capsys):
    """expected: export of a run on a read-only file system: exit 2 at once, one line naming the run; the model
    is not even loaded."""
    from edgeft.cli import app as cli
    from edgeft.run import Run

    run = copy_run(trained_run.run_dir, tmp_path / "run")
    monkeypatch.setattr(Run, "model", property(lambda self: pytest.fail("loaded before the check")))
    make_read_only(monkeypatch, run)
    assert cli.main(["export", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(run) in line and "not writable" in line and "Read-only" in line


def test_unwritable_evaluate_out_is_refused_before_work(trained_run, tmp_path, monkeypatch, image_folder, capsys):
    """expected: evaluate --out in a directory that cannot be written: exit 2 before the model runs, one line."""
    import edgeft.verify.evaluate
    from edgeft.cli import app as cli

    monkeypatch.setattr(edgeft.verify.evaluate, "open_runner", lambda *a, **k: pytest.fail("ran before the check"))
    ro = tmp_path / "ro"
    ro.mkdir()
    make_read_only(monkeypatch, ro, errno.EACCES)
    assert cli.main(["evaluate", str(trained_run.run_dir / "model.keras"), str(image_folder),
                     "--out", str(ro / "eval")]) == 2
    assert "evaluate --out" in one_error_line(capsys.readouterr().err)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def hostile_pngs(where: Path) -> dict[str, Path]:
    """A decompression bomb (30000 x 30000 declared in a few bytes) and a PNG whose text chunk inflates past
    Pillow's limit (ValueError, not OSError)."""
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(good, "PNG")
    good = good.getvalue()
    bomb = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))
    text_bomb = good[:33] + _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 2**23)) + good[33:]
    out = {"bomb": where / "bomb.png", "text_bomb": where / "broken.png"}
    out["bomb"].write_bytes(bomb)
    out["text_bomb"].write_bytes(text_bomb)
    return out


@pytest.mark.parametrize("kind", ["bomb", "text_bomb"])
def test_predict_on_a_hostile_png_is_one_line(trained_run, tmp_path, kind, capsys):
    """expected: `edgeft predict` on a decompression bomb or a PNG whose text chunk is a zip bomb: exit 2, one line
    "cannot read image PATH: ..." (the device script's rule), never a traceback."""
    from edgeft.cli import app as cli

    img = hostile_pngs(tmp_path)[kind]
    assert cli.main(["predict", str(trained_run.run_dir / "model.keras"), str(img)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot read image {img}" in line


def _golden(where: Path, **changes) -> Path:
    g = where / "golden"
    (g / "inputs").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(g / "inputs" / "000.png")
    doc = {"format": "edgeft-golden", "version": 1, "image_size": [32, 32], "labels": ["a", "b"],
           "inputs": [{"file": "inputs/000.png", "pixels_sha256": "0" * 64}],
           "files": {"m.tflite": {"outputs": [[0.5, 0.5]], "max_abs_diff": 1e-4, "top1_must_match": False}}}
    (g / "expected.json").write_text(json.dumps(doc | changes))
    return g


@pytest.mark.parametrize("labels", [5, "ab", [1, 2], {"a": 1}])
def test_verify_with_malformed_labels_is_one_line(tmp_path, labels, capsys):
    """expected: `edgeft_device.py verify` with "labels": 5 (or any non-list of names) in expected.json: exit 2,
    one line naming the file, before the model is opened."""
    from edgeft import device

    golden = _golden(tmp_path, labels=labels)
    model = tmp_path / "m.tflite"
    model.write_bytes(b"not opened")
    assert device.main(["verify", str(model), str(golden)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "expected.json" in line and '"labels"' in line


def test_bench_json_is_checked_before_the_benchmark(tmp_path, monkeypatch, capsys):
    """expected: `edgeft_device.py bench --json` naming a folder or an unwritable path: exit 2, one line, before
    the model is even opened (not after minutes of timing)."""
    from edgeft import device

    monkeypatch.setattr(device, "open_runner", lambda *a, **k: pytest.fail("benchmark ran before the check"))
    model = tmp_path / "m.tflite"
    model.write_bytes(b"not opened")
    assert device.main(["bench", str(model), "--json", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)
    ro = tmp_path / "ro"
    ro.mkdir()
    make_read_only(monkeypatch, ro)
    assert device.main(["bench", str(model), "--json", str(ro / "b.json")]) == 2
    assert "cannot be written" in one_error_line(capsys.readouterr().err)


def test_benchmark_of_a_read_only_run_is_refused_before_timing(trained_run, tmp_path, monkeypatch):
    """expected: `edgeft benchmark RUN` on a run it cannot write (benchmark.json goes there): exit 2 before timing."""
    import edgeft.verify.bench
    from edgeft.verify.bench import benchmark

    run = copy_run(trained_run.run_dir, tmp_path / "run")
    monkeypatch.setattr(edgeft.verify.bench, "KerasRunner", lambda *a, **k: pytest.fail("timed before the check"))
    make_read_only(monkeypatch, run)
    with pytest.raises(UserError, match="benchmark: the run directory .* is not writable"):
        benchmark(run)


def test_any_other_os_error_is_one_line_exit_1(trained_run, tmp_path, monkeypatch, capsys):
    """expected: an OSError no handler names (here EIO while predicting) is still one line with exit 1: the errno
    name, the path and what to do (the CLI's backstop)."""
    import edgeft.verify.evaluate
    from edgeft.cli import app as cli

    def broken(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/dev/sdz")

    monkeypatch.setattr(edgeft.verify.evaluate, "predict", broken)
    assert cli.main(["predict", str(trained_run.run_dir / "model.keras"), str(tmp_path)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "/dev/sdz" in line and "EIO" in line


# ------------------------------------------------------------------ real mounts, where the machine allows
@pytest.fixture
def tmpfs(tmp_path):
    """A real 2 MiB tmpfs (needs root and a kernel that lets this container mount; skipped otherwise)."""
    where = tmp_path / "mnt"
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {r.stderr.strip()[:200]}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _remount(where: Path, mode: str) -> None:
    r = subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot remount {mode}: {r.stderr.strip()[:200]}")


def test_real_full_tmpfs_while_decoding(tmpfs, tmp_path, monkeypatch):
    """expected: on a real 2 MiB tmpfs, decoding a folder that does not fit fails with one line (OperationFailed,
    ENOSPC) and leaves the tmpfs as empty as it was (free-space check bypassed to reach the real write)."""
    import edgeft.data.cache
    from edgeft.data.datasets import scan_folder

    folder = write_digit_folder(tmp_path / "digits", per_class=24)   # 72 images x 147 kB at 221 px > 2 MiB
    monkeypatch.setenv("EDGEFT_CACHE", str(tmpfs / "cache"))
    monkeypatch.setattr(edgeft.data.cache, "check_disk_space", lambda need, where, folder: where.mkdir(parents=True))
    with pytest.raises(OperationFailed, match="ENOSPC"):
        scan_folder(str(folder), 221)
    assert not list((tmpfs / "cache" / "images").glob(".build-*"))
    assert shutil.disk_usage(tmpfs).used < 64 * 1024


def test_real_read_only_mount(tmpfs, tmp_path, monkeypatch, trained_run):
    """expected: on a real read-only mount: the image cache still serves its entries and refuses a new one in one
    line (exit 2); export of a run stored there is refused at once (exit 2)."""
    import edgeft.data.cache
    from edgeft.data.datasets import scan_folder
    from edgeft.pipeline.exporter import export

    monkeypatch.setenv("EDGEFT_CACHE", str(tmpfs / "cache"))   # 2 MiB: below the free-space check's margin
    monkeypatch.setattr(edgeft.data.cache, "check_disk_space",
                        lambda need, where, folder: where.mkdir(parents=True, exist_ok=True))
    a = write_digit_folder(tmp_path / "a", per_class=3)
    b = write_digit_folder(tmp_path / "b", per_class=3, seed=1)
    scan_folder(str(a), 32)
    run = tmpfs / "run"
    run.mkdir()
    for name in ("config.yaml", "labels.txt"):
        shutil.copy2(trained_run.run_dir / name, run / name)
    (run / "model.keras").write_bytes(b"never loaded")
    _remount(tmpfs, "ro")
    try:
        assert len(scan_folder(str(a), 32)) == 9
        with pytest.raises(UserError, match="EDGEFT_CACHE"):
            scan_folder(str(b), 32)
        with pytest.raises(UserError, match="not writable"):
            export(run)
    finally:
        _remount(tmpfs, "rw")


def test_rebuilt_int8_file_sets_aside_the_old_tflm_sources(tmp_path):
    """expected: an export that rebuilds model_int8.tflite without --tflm does not ship the TFLite Micro sources
    of the earlier int8 file: export/tflm/ goes to export/failed/ with the reason."""
    from edgeft.pipeline.exporter import set_aside_stale

    run, stage = tmp_path / "run", tmp_path / "run" / ".export-staging-1"
    (stage / "tflm").mkdir(parents=True)
    (stage / "tflm" / "model_data.cc").write_text("// the earlier int8 file")
    (stage / "model_int8.tflite").write_bytes(b"rebuilt")
    stale = set_aside_stale(run, stage, {"model_int8.tflite"})
    assert list(stale) == ["tflm"] and "earlier model_int8.tflite" in stale["tflm"]
    assert (stage / "failed" / "tflm" / "model_data.cc").is_file() and not (stage / "tflm").exists()
    assert rundir.read_json(stage / "failed" / "stale.json")["tflm"]["reason"] == stale["tflm"]
    (stage / "tflm").mkdir()
    assert set_aside_stale(run, stage, {"model_int8.tflite"}, tflm_rebuilt=True) == {}
