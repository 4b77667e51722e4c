"""What a user reads (issue 29, items 1 and 4): off a terminal, at default verbosity, export, parity,
qat and finetune print at most 25 lines, none wider than 100 columns: one row per file with its
headline accuracy (the test split's, labelled with split and n), the paths of the reports and the
`next:` line; the tables go to logs/edgeft.log and parity.md. export / parity / qat write a summary
JSON (docs/records.md) that matches the files on disk. `edgeft evaluate RUN --split` evaluates the
run's recorded split; on a folder, the images the run trained on are counted and left out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest


LINES, WIDTH = 25, 100
# a progress heartbeat (edgeft.core.progress.step, off a terminal): `export: building x ... 12 s`;
# a tiny run on an idle machine shows a few; a loaded one more, which item 2's rule allows
HEARTBEAT = re.compile(r" \.\.\. \d+ s$")
HEARTBEATS_COUNTED = 3


def check_console(text: str, what: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    wide = [line for line in lines if len(line) > WIDTH]
    assert not wide, f"{what}: {len(wide)} line(s) wider than {WIDTH} columns, e.g. {wide[0]!r}"
    beats = [line for line in lines if HEARTBEAT.search(line)]
    counted = len(lines) - len(beats) + min(len(beats), HEARTBEATS_COUNTED)
    assert counted <= LINES, f"{what}: {counted} lines on the console (at most {LINES}):\n" + "\n".join(lines)
    return lines


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_summary(run: Path, summary: dict, command: str, n_test: int, verdict: str = "pass") -> None:
    """Every entry names a file that is on disk with those bytes and that sha256; the accuracy is the
    test split's (split and n), inside its interval."""
    assert summary["schema"] == f"edgeft.{command}-summary/1" and summary["command"] == command
    assert summary["run"] == str(run.resolve()) and summary["exit_code"] == 0 and summary["passed"] is True
    for f in summary["files"]:
        path = run / f["path"]
        assert path.is_file() and Path(f["abs_path"]) == path.resolve(), f
        assert f["bytes"] == path.stat().st_size and f["sha256"] == _sha(path), f["path"]
        acc = f["accuracy"]
        assert acc["split"] == "test" and acc["label"] == "test" and acc["n"] == n_test, acc
        assert acc["interval"][0] <= acc["value"] <= acc["interval"][1]
        assert f["verdict"] == verdict and f["failure_codes"] == []
    assert summary["accuracy"] == {"split": "test", "label": "test", "n": n_test}


def _console(exported_run, name: str) -> str:
    """What `edgeft NAME RUN` printed in the session's exported_run fixture (tests/conftest.py: the
    command line's entry point in-process, stdout + stderr and file descriptors 1 / 2 kept)."""
    from conftest import CONSOLE

    return (exported_run[0].parent / CONSOLE[name]).read_text()


def test_export_prints_one_row_per_file_and_writes_a_summary_matching_the_files(exported_run):
    from edgeft.core.formats import FORMATS

    run = exported_run[0]
    out = _console(exported_run, "export")
    lines = check_console(out, "edgeft export")
    assert "| format |" not in out and "# Parity" not in out   # the tables are in the log and parity.md
    assert "Parity on" in (run / "logs" / "edgeft.log").read_text()
    shipped = sorted(f.name for f in FORMATS if f.family != "tflm" and (run / "export" / f.filename).is_file())
    assert len(shipped) == 6
    rows = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in shipped]
    assert sorted(rows) == shipped   # one row per file
    n_test = json.loads((run / "split.json").read_text())["counts"]["test"]
    assert f"test n={n_test}" in out and "parity.md: " in out and "report.md: " in out
    assert lines[-1].startswith("next: edgeft benchmark") or "next: edgeft benchmark" in out
    summary = json.loads((run / "export" / "summary.json").read_text())
    check_summary(run, summary, "export", n_test)
    assert sorted(f["format"] for f in summary["files"]) == shipped
    test_acc = json.loads((run / "export" / "test_accuracy.json").read_text())
    for f in summary["files"]:   # the same number everywhere it is quoted
        assert f["accuracy"]["value"] == pytest.approx(test_acc[f["format"]]["accuracy"])
        assert f"{f['format']:<16}" in out and f"{f['accuracy']['value']:.3f} [" in out
    assert "Headline accuracy" in (run / "export" / "parity.md").read_text()
    assert f"accuracy, test n={n_test}" in (run / "report.md").read_text()


def test_qat_prints_few_lines_and_writes_its_summary(exported_run):
    """`edgeft qat RUN --qat-epochs 1` in the fixture; parity's console: tests/test_parity.py."""
    run = exported_run[0]
    out = _console(exported_run, "qat")
    check_console(out, "edgeft qat")
    n_test = json.loads((run / "split.json").read_text())["counts"]["test"]
    summary = json.loads((run / "qat_summary.json").read_text())
    check_summary(run, summary, "qat", n_test, verdict="trained")
    assert [f["path"] for f in summary["files"]] == ["model_qat.weights.h5"]
    assert "keras_qat" in out and f"test n={n_test}" in out


# finetune's console: tests/test_demo.py (the README's first command, as a user runs it)


def test_without_a_test_split_the_headline_is_validation_labelled_tuned_on(trained_run, tmp_path):
    from edgeft.pipeline.summary import report_headline_accuracy
    from edgeft.run import Run

    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run, ignore=shutil.ignore_patterns("export", ".edgeft.lock"))
    (run / "export").mkdir()
    splits = dataclasses.replace(Run.open(run).splits, test=None)
    heads = report_headline_accuracy(run, splits, run / "export", test_split=0.0)
    h = heads["model.keras"]
    assert h["split"] == "val" and h["label"] == "val (tuned on)" and h["n"] == len(splits.val.y)
    assert not (run / "export" / "test_accuracy.json").exists()   # no test number where there is none
    assert f"val (tuned on) n={len(splits.val.y)}" in (run / "report.md").read_text()


def test_evaluate_a_run_on_its_recorded_split(trained_run, capsys):
    from edgeft.cli import app as cli

    run = trained_run.run_dir
    counts = json.loads((Path(run) / "split.json").read_text())["counts"]
    assert cli.main(["evaluate", str(run), "--split", "all", "--out", str(Path(run).parent / "eval_all")]) == 0
    out = capsys.readouterr().out
    assert f"on test n={counts['test']}" in out and f"on val (tuned on) n={counts['val']}" in out
    # a split and a folder: refused before any work
    assert cli.main(["evaluate", str(run), str(run), "--split", "val"]) == 2
    assert "either FOLDER or --split" in capsys.readouterr().err


def test_evaluate_on_a_folder_leaves_out_the_images_the_run_trained_on(trained_run, image_folder, tmp_path, capsys):
    from edgeft.cli import app as cli

    run = trained_run.run_dir
    record = json.loads((Path(run) / "split.json").read_text())
    trained = {row[3] for row in record["files"]["train"]}
    images = sorted(Path(image_folder).rglob("*.png"))
    k = sum(_sha(p) in trained for p in images)   # the training folder: most of its images were trained on
    assert k > len(images) // 2
    model = str(Path(run) / "model.keras")
    assert cli.main(["evaluate", model, str(image_folder), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"{k} of the {len(images)} images are images the run trained on" in out
    assert f"n={len(images) - k}" in out
    assert cli.main(["evaluate", model, str(image_folder), "--include-trained", "--out", str(tmp_path / "b")]) == 0
    cap = capsys.readouterr()
    assert f"n={len(images)}" in cap.out and "--include-trained" in cap.err
    assert json.loads((tmp_path / "b" / "evaluation.json").read_text())["trained_images"] == k
