"""Nothing lost, nothing contaminated (docs/reliability.md): what --overwrite may remove, lock first,
a run keeps the split it trained on, train / val / test disjoint by content, the default run
directory never inside the data."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, write_digit_folder
from integrity_cases import CASES, digits, fake_run, snapshot

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- every refusal: cheap, one line, nothing changed
@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    env = {**os.environ, "EDGEFT_CACHE": str(tmp_path_factory.mktemp("refusal-cache"))}
    r = subprocess.run([sys.executable, str(HERE / "integrity_cases.py"), str(root)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.faults
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_refusal_is_cheap_and_changes_nothing(refusals, case):
    """expected: exit 2 with one `edgeft: error:` line (`edgeft CMD: error:` from argparse) naming the problem,
    within 3 s, before TensorFlow is imported, the case's file tree (paths and bytes) exactly as it was."""
    r = refusals[case]
    errors = [line for line in r["stderr"].splitlines() if re.match(r"edgeft( \w+)?: error:", line)]   # argparse's too
    assert r["rc"] == 2, r
    assert len(errors) == 1 and r["expect"] in errors[0] and "Traceback" not in r["stderr"], r["stderr"]
    assert not r["tensorflow"], "TensorFlow was imported before the refusal"
    assert r["unchanged"], "the refused command changed the tree"
    assert r["seconds"] < 3.0, r["seconds"]
    assert max(len(line) for line in errors) <= 400, "an error line quoted a value whole"


# ---------------------------------------------------------------- what --overwrite may remove
def test_the_marker_lists_what_edgeft_wrote_and_nothing_else(tmp_path):
    from edgeft.core import owned, rundir

    run = rundir.prepare_run_dir(tmp_path / "run", False, False)
    rundir.write_text(run / "config.yaml", "x: 1\n")
    rundir.write_json(run / "export" / "failed" / "parity.json", {})   # its top-level entry is listed
    assert owned.header(run) == "run" and owned.entries(run) == {"config.yaml", "export"}
    assert owned.foreign_entries(run, "run") == []
    (run / "mine.txt").write_text("user")
    assert owned.foreign_entries(run, "run") == ["mine.txt"]
    with pytest.raises(Exception, match="mine.txt"):
        owned.check_replaceable(run, "run")
    with pytest.raises(Exception, match="not a search directory"):
        (run / "mine.txt").unlink() or owned.check_replaceable(run, "search")
    owned.check_replaceable(run, "run")   # only edgeft's: may be replaced


def test_a_folder_named_like_a_run_is_not_one(tmp_path):
    """config.yaml + labels.txt + data_report.json with a user's file beside them is not an older run
    edgeft may replace: the legacy rule accepts only edgeft's own names."""
    from edgeft.core import owned

    d = tmp_path / "legacy"
    d.mkdir()
    for n in ("config.yaml", "labels.txt", "data_report.json", "model.keras"):
        (d / n).write_text("x")
    owned.check_replaceable(d, "run")   # a run made before the marker: every name is edgeft's
    (d / "thesis.tex").write_text("mine")
    with pytest.raises(Exception, match="thesis.tex"):
        owned.check_replaceable(d, "run")


@pytest.mark.slow
def test_a_finished_and_exported_run_holds_only_listed_entries(exported_run):
    """Every entry finetune, qat and export made is in the marker: --overwrite may replace it."""
    from edgeft.core import owned

    run, _ = exported_run
    assert owned.header(run) == "run"
    assert owned.foreign_entries(run, "run") == []
    assert {"config.yaml", "model.keras", "split.json", "export", "checkpoints", "logs"} <= owned.entries(run)


# ---------------------------------------------------------------- a run keeps its split
def _quiet(fn, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **k)


def _rel(paths, root):
    return sorted(str(Path(p).relative_to(root)) for p in paths)


def test_added_files_are_ignored_and_counted(tmp_path, capsys):
    from edgeft.run import Run

    data = digits(tmp_path / "data")
    run = _quiet(fake_run, tmp_path / "run", data)
    before = _quiet(lambda: Run.open(run).splits)
    pixels = {name: getattr(before, name).x for name in ("train", "val", "test")}   # its cache entry goes
    write_digit_folder(tmp_path / "more", per_class=3, seed=11)
    for c in ("five", "six", "seven"):
        for p in (tmp_path / "more" / c).iterdir():
            shutil.copy(p, data / c / f"added_{p.name}")
    (data / "eight").mkdir()   # a new class folder: not the run's
    shutil.copy(data / "five" / "000.png", data / "eight" / "x.png")
    capsys.readouterr()
    after = Run.open(run).splits
    out = capsys.readouterr().out
    assert "9 image(s) added to the folder since the run was trained are not used" in out
    assert "eight" in out
    for name in ("train", "val", "test"):
        assert _rel(getattr(after, name).paths, data) == _rel(getattr(before, name).paths, data)
        assert np.array_equal(getattr(after, name).x, pixels[name])


def test_a_moved_data_folder_still_matches(tmp_path):
    """The run and its data moved together: the recorded paths are relative."""
    from edgeft.run import Run

    data = digits(tmp_path / "a" / "data")
    run = _quiet(fake_run, tmp_path / "a" / "run", data)
    before = _quiet(lambda: Run.open(run).splits)
    shutil.move(tmp_path / "a", tmp_path / "b")
    after = _quiet(lambda: Run.open(tmp_path / "b" / "run").splits)
    assert _rel(after.val.paths, tmp_path / "b" / "data") == _rel(before.val.paths, data)


def test_a_run_without_a_split_record_is_split_again_and_says_so_once(tmp_path, capsys):
    from edgeft.run import Run

    data = digits(tmp_path / "data")
    run = _quiet(fake_run, tmp_path / "run", data)
    recorded = _quiet(lambda: Run.open(run).splits)
    (run / "split.json").unlink()
    capsys.readouterr()
    for _ in range(2):
        again = Run.open(run).splits
    err = capsys.readouterr().err
    assert err.count("made before edgeft recorded each run's split") == 1
    assert _rel(again.val.paths, data) == _rel(recorded.val.paths, data)   # same folder, same seed: same split


@pytest.mark.slow
def test_export_of_a_trained_run_refuses_a_changed_split_and_ignores_new_files(trained_run, image_folder, tmp_path,
                                                                               capsys):
    """Issue case 3 on a real trained run: before split.json, export re-split the grown folder (4 of 8 test and 7
    of 12 validation images were training images) and shipped."""
    from edgeft.cli import app as cli
    from edgeft.run import Run

    data = Path(shutil.copytree(image_folder, tmp_path / "data"))
    run = Path(shutil.copytree(trained_run.run_dir, tmp_path / "run"))
    cfg = (run / "config.yaml").read_text()
    assert f"folder: {image_folder}" in cfg
    (run / "config.yaml").write_text(cfg.replace(f"folder: {image_folder}", f"folder: {data}"))
    original = Run.open(trained_run.run_dir).splits
    write_digit_folder(tmp_path / "more", per_class=2, seed=21)
    for c in ("five", "six", "seven"):
        for p in (tmp_path / "more" / c).iterdir():
            shutil.copy(p, data / c / f"new_{p.name}")
    grown = Run.open(run).splits
    for name in ("train", "val", "test"):
        assert _rel(getattr(grown, name).paths, data) == _rel(getattr(original, name).paths, image_folder)
    victim = data / _rel(original.val.paths, image_folder)[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    capsys.readouterr()
    before = snapshot(run)
    assert cli.main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert "changed since the run was trained" in err and victim.name in err
    assert snapshot(run) == before and not (run / "export").exists()


# ---------------------------------------------------------------- disjoint by content
def test_copies_inside_a_folder_stay_on_one_side_and_are_counted(tmp_path):
    from edgeft.data.datasets import duplicates_report, scan_folder, stratified_split

    data = digits(tmp_path / "data", per_class=12)
    for c in ("five", "six", "seven"):   # three copies of two images per class (scraped sets)
        for k in range(3):
            shutil.copy(data / c / "000.png", data / c / f"dup0_{k}.png")
            shutil.copy(data / c / "001.png", data / c / f"dup1_{k}.png")
    s = _quiet(scan_folder, str(data), 32)
    for seed in range(6):
        parts = stratified_split(s, 0.3, seed, 0.2)
        side = {}
        for k, idx in enumerate(parts):
            for i in idx:
                side.setdefault(s.sha256[i], set()).add(k)
        assert all(len(v) == 1 for v in side.values()), "a copy landed on two sides of the split"
        assert sum(len(p) for p in parts) == len(s.y)
    rep = duplicates_report(s)
    assert rep["copies"] == 18 and rep["groups"] == 6 and rep["groups_across_classes"] == 0


def test_a_folder_without_copies_is_split_as_before(tmp_path):
    """Grouping changes nothing for a folder without copies: the same indices as the ungrouped draw."""
    from edgeft.data.datasets import scan_folder, stratified_split

    s = _quiet(scan_folder, str(digits(tmp_path / "data", per_class=15)), 32)
    plain = stratified_split(s, 0.25, 3, 0.1)
    s.sha256 = None   # no hashes: every image its own group (the rule before)
    assert all(np.array_equal(a, b) for a, b in zip(plain, stratified_split(s, 0.25, 3, 0.1)))


# ---------------------------------------------------------------- the default run directory, edgeft's folders
def test_the_default_run_dir_for_dot_is_beside_the_data(tmp_path, monkeypatch):
    from edgeft.core.rundir import default_run_dir

    data = tmp_path / "flowers"
    data.mkdir()
    monkeypatch.chdir(data)
    out = default_run_dir(".", "mobilenet_v2")
    assert out.name == "flowers_mobilenet_v2"
    assert data.resolve() not in Path(os.path.realpath(out)).parents
    monkeypatch.chdir(tmp_path)
    assert default_run_dir("flowers", "vgg16") == Path("runs") / "flowers_vgg16"


def test_edgeft_folders_inside_the_data_are_not_classes(tmp_path, capsys):
    from edgeft.core import owned
    from edgeft.data.images import list_folder

    data = digits(tmp_path / "data")
    run = data / "runs" / "data_mobilenet_v2"
    run.mkdir(parents=True)
    owned.mark(run, "run")
    shutil.copy(data / "five" / "000.png", run / "curves.png")   # a run's plots are images too
    legacy = data / "old_run"
    legacy.mkdir()
    for n in ("config.yaml", "labels.txt", "data_report.json"):
        (legacy / n).write_text("x")
    shutil.copy(data / "six" / "000.png", legacy / "confusion_matrix.png")
    nested = data / "five" / "my_run"   # a run inside a class folder: its files are not images of the class
    nested.mkdir()
    owned.mark(nested, "run")
    shutil.copy(data / "seven" / "000.png", nested / "curves.png")
    listing = list_folder(data)
    assert listing.classes == ["five", "seven", "six"]
    assert not any("my_run" in p for p, _ in listing.files)
    assert "runs" in capsys.readouterr().out


@pytest.mark.slow
def test_finetune_dot_inside_the_data_writes_beside_it(tmp_path):
    """Issue case 5: `edgeft finetune .` in the data folder wrote runs/_mobilenet_v2 into the data, and the next
    run learned a class `runs` from its plots."""
    data = digits(tmp_path / "flowers")
    from integrity_cases import TINY

    before = snapshot(data)
    r = run_cli("finetune", ".", *TINY, cwd=data)
    assert r.returncode == 0, r.stderr[-2000:]
    assert snapshot(data) == before, "the run was written into the data folder"
    run = tmp_path / "runs" / "flowers_mobilenet_v2"
    assert (run / "model.keras").is_file()
    assert (run / "labels.txt").read_text().split() == ["five", "seven", "six"]
