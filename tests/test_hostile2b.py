"""Hostile input, round 2 (issue 28), the cases that act on a run: an --out that is a symbolic link,
export/ replaced by one, `export --check` on a copied run, a model whose outputs do not match the
run's labels, `finetune --resume` on a finished run, an ONNX opset tf2onnx cannot write."""
from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integrity_cases import digits, fake_run, snapshot  # noqa: E402


def tree(root: Path) -> dict:
    """Every entry under `root`, files by bytes and mtime (integrity_cases.snapshot)."""
    return snapshot(root, mtimes=True)


def one_error(err: str) -> str:
    """The single `edgeft: error:` line of a refusal (progress lines may come before it)."""
    errors = [line for line in err.splitlines() if line.startswith("edgeft: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def cli(capsys, *argv) -> tuple[int, str, str]:
    from edgeft.cli.app import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- --out a symbolic link, --overwrite
@pytest.mark.faults
def test_overwrite_through_a_symlinked_out_keeps_the_link(tmp_path, monkeypatch):
    """expected: `finetune --out LINK --overwrite` (LINK -> an old run) replaces the run LINK points to and
    leaves LINK as it was; the link was renamed away to .LINK.old-TIME and the run left behind."""
    from edgeft.core import owned, rundir

    monkeypatch.chdir(tmp_path)
    data = digits(tmp_path / "data", per_class=3)
    real = fake_run(tmp_path / "disk" / "run", data)
    link = tmp_path / "latest"
    link.symlink_to(real)
    out = rundir.prepare_run_dir(link, True, False, data=(str(data),))
    assert out == link and link.is_symlink() and os.readlink(link) == str(real)
    assert owned.header(real) == "run" and not (real / rundir.MODEL).exists()   # the old run went, the dir stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "disk", "latest"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["run"]   # no .run.old-* left either


@pytest.mark.faults
def test_search_overwrite_through_a_symlinked_out_keeps_the_link(tmp_path, monkeypatch):
    """expected: `search --out LINK --overwrite` empties the search directory LINK points to and keeps LINK."""
    from integrity_cases import fake_search

    from edgeft.core import owned
    from edgeft.search.runner import _replace_dir

    monkeypatch.chdir(tmp_path)
    real = fake_search(tmp_path / "disk" / "s")
    (real / ".edgeft.lock").unlink()
    link = tmp_path / "s"
    link.symlink_to(real)
    _replace_dir(link, types.SimpleNamespace(folder=str(tmp_path / "data")))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert owned.header(real) == "search" and not (real / "search.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "s"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["s"]


@pytest.mark.faults
def test_export_into_a_symlinked_export_dir_is_refused_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """expected: RUN/export a symbolic link: export refuses in one line (exit 2) before any work, the link
    and the files it points to unchanged; it was renamed to .export-old-PID and left behind."""
    monkeypatch.chdir(tmp_path)
    data = digits(tmp_path / "data", per_class=3)
    run = fake_run(tmp_path / "run", data)
    elsewhere = tmp_path / "usb" / "export"
    elsewhere.mkdir(parents=True)
    (elsewhere / "model.onnx").write_bytes(b"an earlier export")
    (run / "export").symlink_to(elsewhere)
    before = tree(tmp_path)
    rc, _, err = cli(capsys, "export", run, "--onnx", "float")
    assert rc == 2 and "symbolic link" in one_error(err), err
    assert tree(tmp_path) == before


def test_a_leftover_link_of_a_killed_export_is_removed(tmp_path):
    from edgeft.pipeline.staging import open_staging

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (run / ".export-old-123").symlink_to(target)
    stage = open_staging(run)
    assert not (run / ".export-old-123").is_symlink() and target.is_dir() and stage.is_dir()


# ---------------------------------------------------------------- finetune --resume on a finished run
@pytest.mark.faults
def test_resume_of_a_finished_run_touches_nothing(tmp_path, monkeypatch, capsys):
    """expected: `finetune --resume` on a run that finished says so (exit 0) and changes no file (bytes and
    mtimes); it re-saved model.keras, so a later partial export set aside every shipped file."""
    from edgeft.core import rundir

    monkeypatch.chdir(tmp_path)
    data = digits(tmp_path / "data", per_class=3)
    # a config a resume could run to the end (seed recipe, one head epoch): only the refusal to touch it can pass
    run = fake_run(tmp_path / "run", data, {"recipe": "seed", "head_epochs": 1, "finetune_epochs": 0})
    rundir.write_text(run / rundir.REPORT, "# report\n")
    before = tree(tmp_path)
    rc, out, err = cli(capsys, "finetune", "--resume", "--out", run)
    assert rc == 0, err
    assert "already finished" in out and "nothing to resume" in out
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- labels against the model's outputs
def _tiny_model(path: Path, outputs: int) -> None:
    from edgeft._keras import keras

    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(inp)
    keras.Model(inp, keras.layers.Dense(outputs, activation="softmax")(x)).save(str(path))


@pytest.mark.faults
def test_a_model_whose_outputs_are_not_the_runs_classes_is_refused_before_conversion(tmp_path, monkeypatch,
                                                                                    capsys):
    """expected: a model.keras with 4 outputs in a run of 3 classes, or a labels.txt of 2 lines: export says
    so in one line (exit 2) before converting anything; it was found only after conversion and the gate."""
    monkeypatch.chdir(tmp_path)
    data = digits(tmp_path / "data", per_class=3)
    run = fake_run(tmp_path / "run", data)
    _tiny_model(run / "model.keras", 4)
    rc, out, err = cli(capsys, "export", run, "--onnx", "float")
    line = one_error(err)
    assert rc == 2 and "4 outputs" in line and "3 classes" in line, err
    assert "built" not in out and not (run / "export").exists()
    _tiny_model(run / "model.keras", 3)
    (run / "labels.txt").write_text("five\nsix\n")
    rc, out, err = cli(capsys, "export", run, "--onnx", "float")
    line = one_error(err)
    assert rc == 2 and "labels.txt names 2 classes" in line and "3 outputs" in line, err
    assert "built" not in out and not (run / "export").exists()


# ---------------------------------------------------------------- an opset tf2onnx cannot write
@pytest.mark.faults
def test_a_failed_onnx_conversion_is_one_line_without_tf2onnx_tracebacks(capfd):
    """expected: when tf2onnx cannot convert (here opset 1, past the refusal of a typed --opset), one error
    naming tf2onnx's first complaint, and none of its tracebacks on the console; it logged a traceback
    per node and went on to write a file no runtime loads."""
    from edgeft._keras import keras
    from edgeft.core.errors import UserError
    from edgeft.export.keras2onnx import onnx_float_bytes

    inp = keras.Input((32, 32, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    capfd.readouterr()
    with pytest.raises(UserError, match="tf2onnx could not convert the model to ONNX opset 1: .*FusedBatchNorm"):
        onnx_float_bytes(model, 32, 1, {})
    _, err = capfd.readouterr()
    assert "Traceback" not in err and "Failed to convert" not in err, err[-2000:]


# ---------------------------------------------------------------- export --check and a full TMPDIR
@pytest.mark.faults
def test_export_check_names_a_full_tmpdir_not_the_run(tmp_path, monkeypatch, capsys):
    """expected: `export --check` with too little room in TMPDIR for its copy of the run: one line naming the
    temporary folder (TMPDIR), exit 2, before any work; a copy that fails there all the same: exit 1, naming
    it too. It named the run's own model.keras (copy2's error names the source)."""
    import errno
    import tempfile
    from collections import namedtuple

    from edgeft.core import rundir

    monkeypatch.chdir(tmp_path)
    data = digits(tmp_path / "data", per_class=3)
    run = fake_run(tmp_path / "run", data)
    rundir.write_json(run / "export" / "manifest.json", {"files": {}})
    full = tmp_path / "full-tmp"
    full.mkdir()
    monkeypatch.setenv("TMPDIR", str(full))
    monkeypatch.setattr(tempfile, "tempdir", None)   # read TMPDIR again
    real_usage, real_copy = shutil.disk_usage, shutil.copy2

    def copy2(src, dst, **kw):   # TMPDIR is full: writing there fails as a full disk does
        if str(full) in str(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real_copy(src, dst, **kw)

    usage = namedtuple("usage", "total used free")
    free = {"bytes": 100}
    monkeypatch.setattr(shutil, "copy2", copy2)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: usage(10**9, 10**9 - free["bytes"], free["bytes"]) if Path(p) == full
                        else real_usage(p))
    rc, _, err = cli(capsys, "export", run, "--check")
    line = one_error(err)
    assert rc == 2 and str(full) in line and "TMPDIR" in line, err
    assert str(run) not in line.replace(str(full), "")
    free["bytes"] = 10**9   # room by the numbers, and the copy fails all the same
    rc, _, err = cli(capsys, "export", run, "--check")
    line = one_error(err)
    assert rc == 1 and "TMPDIR" in line and "No space left on device" in line, err
    assert str(run / "model.keras") not in line and str(full) in line, line
    assert list(full.iterdir()) == []


def test_a_run_killed_before_its_qat_finished_is_not_finished(tmp_path, monkeypatch):
    from edgeft.core import rundir
    from edgeft.pipeline.preflight import finished_run

    monkeypatch.chdir(tmp_path)
    data = digits(tmp_path / "data", per_class=3)
    run = fake_run(tmp_path / "run", data, {"qat_epochs": 1})
    assert finished_run(run) is None                     # no report.md: finish never ran
    rundir.write_text(run / rundir.REPORT, "# report\n")   # (an export may write one into a killed run)
    assert finished_run(run) is None                     # asked for QAT: no QAT model, no QAT metrics
    rundir.write_json(run / rundir.METRICS, {"qat": {"skipped": "not supported"}})
    assert finished_run(run) is not None
