"""Portable, cumulative records (issue 29 item 5).

- every path a run records is stored absolute and relative to the run (config.yaml's
  `paths_from_run`, split.json's `roots_from_run`); reading tries the absolute one, then the
  relative one, then `--data DIR`;
- a relative EDGEFT_CACHE is resolved once, at start;
- a partial export keeps the rows of the files it keeps in parity.json, parity.md and report.md;
- `edgeft qat` updates report.md, curves.png and the TensorBoard logs; report.md says why QAT or
  PTQ ships.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import yaml

from edgeft.cli.app import main


def test_a_relative_edgeft_cache_is_resolved_once(tmp_path, monkeypatch):
    from edgeft.data.cache import cache_root
    from edgeft.data.demo import default_demo_dir

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rel = f"cache-{tmp_path.name}"   # unique: resolved once per process
    monkeypatch.setenv("EDGEFT_CACHE", rel)
    monkeypatch.chdir(a)
    first = cache_root()
    monkeypatch.chdir(b)
    assert cache_root() == first == a / rel
    assert default_demo_dir() == a / rel / "demo_digits"
    # the command line resolves it at start, for itself and the processes it starts
    monkeypatch.setenv("EDGEFT_CACHE", f"cli-{rel}")
    assert main(["parity", str(tmp_path / "no-run")]) == 2
    assert os.environ["EDGEFT_CACHE"] == str(b / f"cli-{rel}")


def test_config_yaml_records_paths_absolute_and_relative_to_the_run(tmp_path, monkeypatch):
    from edgeft.core.config import build_config, from_yaml_file, load_yaml, to_yaml

    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "w.h5").write_bytes(b"weights")
    run = proj / "runs" / "x"
    run.mkdir(parents=True)
    monkeypatch.chdir(proj)
    cfg = build_config({"folder": "data", "weights": "w.h5", "image_size": 96})
    (run / "config.yaml").write_text(to_yaml(cfg, Path("runs/x")))
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["data"]["folder"] == str(proj / "data") and stored["model"]["weights"] == str(proj / "w.h5")
    assert stored["paths_from_run"] == {"folder": "../../data", "weights": "../../w.h5"}
    assert build_config(load_yaml(run / "config.yaml")).data.folder == str(proj / "data")   # --config reads it
    moved = tmp_path / "moved"
    os.rename(proj, moved)
    monkeypatch.chdir(tmp_path)
    back = from_yaml_file(moved / "runs" / "x" / "config.yaml")
    assert (back.data.folder, back.model.weights) == (str(moved / "data"), str(moved / "w.h5"))


def test_data_finds_a_data_folder_moved_away_from_its_run(tmp_path, capsys):
    """TF-free (a stand-in run): the data folder moved alone is found nowhere the run recorded, so it
    is asked for by name; --data DIR finds it (the recorded split then checks every file)."""
    from integrity_cases import digits, fake_run

    from edgeft.core.errors import UserError
    from edgeft.pipeline.preflight import check_run

    data = digits(tmp_path / "a" / "data")
    run = fake_run(tmp_path / "a" / "run", data)
    before = check_run(run).splits
    os.rename(data, tmp_path / "data-now")
    try:
        check_run(run)
        raise AssertionError("a run whose data folder moved away was opened")
    except UserError as e:
        assert "is not found" in str(e) and str(data) in str(e) and "--data DIR" in str(e)
    after = check_run(run, data=str(tmp_path / "data-now")).splits
    assert [Path(p).name for p in after.val.paths] == [Path(p).name for p in before.val.paths]
    assert main(["export", str(run), "--data", str(tmp_path / "nowhere")]) == 2
    assert "--data " + str(tmp_path / "nowhere") + ": not a folder" in capsys.readouterr().err


def _as_trained_in(run_src: Path, proj: Path, image_folder: Path) -> Path:
    """A copy of a run and its data in `proj`, recorded as if it had been trained there."""
    from edgeft.core.config import from_yaml_file, to_yaml

    shutil.copytree(image_folder, proj / "data")
    run = proj / "runs" / "x"
    shutil.copytree(run_src, run)
    cfg = from_yaml_file(run / "config.yaml")
    (run / "config.yaml").write_text(to_yaml(replace(cfg, data=replace(cfg.data, folder=str(proj / "data"))), run))
    split = json.loads((run / "split.json").read_text())
    split["roots"], split["roots_from_run"] = {"data": str(proj / "data")}, {"data": "../../data"}
    (run / "split.json").write_text(json.dumps(split))
    return run


def test_a_moved_run_finds_its_data_from_another_directory_or_by_data(trained_run, image_folder, tmp_path,
                                                                      monkeypatch, capsys):
    _as_trained_in(trained_run.run_dir, tmp_path / "proj", image_folder)
    os.rename(tmp_path / "proj", tmp_path / "moved")   # the run and its data moved together
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run = "../moved/runs/x"
    assert main(["benchmark", run, "--runs", "2", "--warmup-runs", "0", "--threads", "1"]) == 0
    bench = json.loads((tmp_path / "moved" / "runs" / "x" / "benchmark.json").read_text())
    assert bench["data"] == "test" and bench["n_images"] > 0   # the headline split (issue 29 item 4)
    assert main(["evaluate", f"{run}/model.keras", "../moved/data", "--out", "eval"]) == 0
    # then the data alone moves: found nowhere recorded, so it is asked for, and --data finds it
    os.rename(tmp_path / "moved" / "data", tmp_path / "data-now")
    capsys.readouterr()
    assert main(["export", run, "--tflite", "float", "--client-inputs", "0"]) == 2
    err = capsys.readouterr().err
    assert "is not found" in err and "--data DIR" in err and str(tmp_path / "moved" / "data") in err
    # export, qat, parity and benchmark resolve --data as evaluate does below (pipeline.preflight.check_run:
    # test_data_finds_a_data_folder_moved_away_from_its_run); one real command with --data is enough here
    # evaluate RUN (its recorded split) reads the data the same way
    capsys.readouterr()
    assert main(["evaluate", run, "--split", "val", "--out", "eval2"]) == 2
    assert "--data DIR" in capsys.readouterr().err
    assert main(["evaluate", run, "--split", "val", "--out", "eval2", "--data", "../data-now"]) == 0
    assert json.loads((Path("eval2") / "evaluation.json").read_text())["split"] == "val (tuned on)"


def test_a_partial_export_keeps_the_other_files_rows(exported_run, tmp_path):
    from edgeft.core.config import build_config, from_yaml_file
    from edgeft.pipeline.exporter import export

    run = tmp_path / "run"
    shutil.copytree(exported_run[0], run)
    cfg = build_config({"client_inputs": 0, "parity_inputs": 120, "floor_inputs": 0},
                       base=from_yaml_file(run / "config.yaml"))
    export(run, tflite=["float"], cfg=cfg)
    shipped = {p.name for p in (run / "export").iterdir() if p.suffix in (".tflite", ".onnx")}
    assert len(shipped) > 2
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert {r["file"] for r in parity["rows"]} == shipped
    assert [r["file"] for r in parity["rows"] if not r.get("kept")] == ["model_float.tflite"]
    md = (run / "export" / "parity.md").read_text()
    report = (run / "report.md").read_text()
    gate_section = report.split("## Export and parity gate", 1)[1].split("\n## ", 1)[0]
    test_section = report.split("## Test accuracy of the exported files", 1)[1].split("\n## ", 1)[0]
    for name in shipped:
        assert f"| {name} |" in md and f"| {name} |" in gate_section
    tested = json.loads((run / "export" / "test_accuracy.json").read_text())
    assert set(tested) == {"keras"} | {r["format"] for r in parity["rows"] if r["format"] != "tflm_int8"}
    assert all(f"| {fmt} |" in test_section for fmt in tested)
    # why QAT or PTQ ships, in this run's numbers (the run has a QAT model)
    choice = json.loads((run / "export" / "formats.json").read_text())["int8_choice"]
    assert "against PTQ's on the same inputs" in choice["why"] and choice["why"] in gate_section


def test_qat_updates_report_curves_and_tensorboard(trained_run, exported_run):
    """exported_run is trained_run's copy after `run_qat` (what `edgeft qat` calls, with no scope:
    the reports are its own) and an export: QAT's row, curves and logs are there, not only in
    metrics.json."""
    run = exported_run[0]
    before = trained_run.run_dir
    assert "| qat |" not in (before / "report.md").read_text() and not (before / "logs" / "qat").exists()
    report = (run / "report.md").read_text()
    qat = json.loads((run / "metrics.json").read_text())["qat"]
    assert f"| qat | {qat['val_accuracy']:.4f} |" in report and "int8 after QAT" in report
    assert "clearly more accurate than PTQ" in report
    assert (run / "curves.png").read_bytes() != (before / "curves.png").read_bytes()
    assert list((run / "logs" / "qat").rglob("events.out.tfevents*"))
