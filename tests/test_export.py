"""Export: every format is written, has the input contract, and passes its parity tier."""
import json
import shutil
import zipfile

import numpy as np
import pytest

from edgeft.core import rundir

from edgeft.core.errors import UserError
from edgeft.core.formats import FORMATS, select_formats
from edgeft.export.keras2tflite import float_ops_in_tflite
from edgeft.nn.runtime import OnnxRunner, TFLiteRunner, embedded_tflite_labels, read_labels


GATED = [f for f in FORMATS if f.family != "tflm" and f.default]   # what a plain `edgeft export` writes and gates (16x8 and the mixed files are opt-in or recovered)


def test_every_format_passes_its_tier(exported_run):
    run, report = exported_run
    rows = {r["format"]: r for r in report["rows"]}
    assert set(rows) == {f.name for f in GATED}
    for name, row in rows.items():
        assert row["passed"], (name, row["failures"])
        assert row["n"] == report["n_inputs"] >= 1000
        assert row["size_bytes"] == (run / "export" / row["file"]).stat().st_size
        lo, hi = row["agreement_interval"]   # over source images: as wide as a dozen images make it
        assert lo <= row["agreement"] <= hi
        assert row["n_images"] == report["n_validation_images"] and row["points_per_image"] == pytest.approx(
            100 / row["n_images"])
    choice = rundir.read_json(run / "export" / "formats.json")["int8_choice"]
    assert rows["tflite_int8"]["made_from"] == choice["shipped"] and rows["onnx_int8"]["made_from"] == "ptq"
    assert rows["tflite_int8"]["reference"] == ("keras qat" if choice["shipped"] == "qat" else "keras float")
    # quantized files are really smaller than the float ones
    assert rows["tflite_int8"]["size_bytes"] < 0.5 * rows["tflite_float"]["size_bytes"]
    assert rows["onnx_int8"]["size_bytes"] < 0.5 * rows["onnx_float"]["size_bytes"]
    md = (run / "export" / "parity.md").read_text()   # the headline table and the gate's table: a row each
    assert md.count("| pass |") == 2 * len(GATED) and all(f"| {f.filename} |" in md for f in GATED)


def test_auto_int8_source_ships_the_better_file_and_says_so(exported_run):
    """Both int8 files were built and run by LiteRT; QAT shipped only if it passed and was clearly more
    accurate than PTQ (paired interval of its gain above 0), and formats.json, parity.md and report.md
    all record it."""
    from edgeft.quantize.int8_choice import tflite_probs

    run, report = exported_run
    choice = rundir.read_json(run / "export" / "formats.json")["int8_choice"]
    cands = {c["source"]: c for c in choice["candidates"]}
    assert set(cands) == {"ptq", "qat"} and all(c["n"] >= 1000 for c in cands.values())
    gain = choice["qat_gain_points"]
    assert gain["interval"][0] <= gain["gain"] <= gain["interval"][1]
    clearly = cands["qat"]["passes_tier"] and gain["interval"][0] > 0
    best = cands["qat"] if clearly or not cands["ptq"]["passes_tier"] and cands["qat"]["passes_tier"] else cands["ptq"]
    assert choice["shipped"] == best["source"]
    # the shipped file really is that candidate: same accuracy when run again on the same inputs
    from edgeft.core.config import from_yaml_file
    from edgeft.data.datasets import gate_inputs
    from edgeft.run import run_splits

    cfg = from_yaml_file(run / "config.yaml")
    inputs = gate_inputs(run_splits(cfg).val, cfg)
    probs = tflite_probs((run / "export" / "model_int8.tflite").read_bytes(), inputs.x)
    assert float(np.mean(probs.argmax(-1) == inputs.y)) == pytest.approx(best["accuracy"], abs=1e-9)
    for text in ((run / "export" / "parity.md").read_text(), (run / "report.md").read_text()):
        assert f"ships **{choice['shipped']}**" in text and "| ptq |" in text and "| qat |" in text


def test_int8_tflite_is_full_integer_with_uint8_io(exported_run):
    run, _ = exported_run
    data = (run / "export" / "model_int8.tflite").read_bytes()
    assert float_ops_in_tflite(data) == []
    r = TFLiteRunner(run / "export" / "model_int8.tflite")
    assert r.input["dtype"] == np.uint8 and r.output["dtype"] == np.uint8
    assert r.input["quantization"] == (1.0, 0)   # raw pixels map exactly
    assert r.input_hw == (32, 32)


def test_float_op_checker_can_fail(exported_run):
    run, _ = exported_run
    ops = float_ops_in_tflite((run / "export" / "model_float.tflite").read_bytes())
    assert "CONV_2D" in ops


def test_one_input_contract_for_every_file(exported_run, image_folder):
    run, _ = exported_run
    from edgeft.data.images import load_image

    img = load_image(next((image_folder / "six").glob("*.png")), 32).astype(np.float32)[None]
    for fmt in GATED:
        path = run / "export" / fmt.filename
        runner = (TFLiteRunner if path.suffix == ".tflite" else OnnxRunner)(path)
        probs = runner.predict(img)
        assert probs.shape == (1, 3), fmt.name
        assert abs(float(probs.sum()) - 1.0) < 0.05, fmt.name   # probabilities, not logits


def test_labels_read_back_from_tflite_files(exported_run, tmp_path):
    """Every .tflite file carries its labels (an appended zip archive) and still runs."""
    run, _ = exported_run
    for fmt in GATED:
        if fmt.family != "tflite":
            continue
        lonely = tmp_path / fmt.filename
        shutil.copy(run / "export" / fmt.filename, lonely)     # no labels.txt beside it
        assert read_labels(lonely) == ["five", "seven", "six"], fmt.name
        with zipfile.ZipFile(lonely) as zf:
            assert zf.namelist() == ["labels.txt"]   # TFLite Model Metadata's associated file
    assert embedded_tflite_labels(run / "export" / "model.onnx") is None


def test_labels_read_back_from_onnx_metadata(exported_run, tmp_path):
    run, _ = exported_run
    for name in ("model.onnx", "model_int8.onnx"):
        lonely = tmp_path / name
        shutil.copy(run / "export" / name, lonely)     # no labels.txt beside it
        assert read_labels(lonely) == ["five", "seven", "six"]
        meta = OnnxRunner(lonely).metadata()
        assert json.loads(meta["labels"]) == ["five", "seven", "six"]


def test_export_leaves_no_temp_files(exported_run):
    run, _ = exported_run
    assert not [p.name for p in (run / "export").iterdir() if p.name.startswith(".")]


def test_select_formats():
    assert [f.name for f in select_formats(["int8"], ["float"])] == ["tflite_int8", "onnx_float"]
    assert len(select_formats(None, None)) == len(GATED)
    assert [f.name for f in select_formats(None, None, tflm=True)][-1] == "tflm_int8"
    assert [f.family for f in select_formats(None, ["all"])] == ["onnx", "onnx"]
    with pytest.raises(UserError, match="choose from"):
        select_formats(["int4"], None)


def test_int8_source_choice_is_recorded_and_used_by_parity(exported_run, trained_run, tmp_path):
    from conftest import run_cli
    from edgeft.core.config import build_config, from_yaml_file
    from edgeft.pipeline.exporter import export

    run, _ = exported_run
    made = rundir.read_json(run / "export" / "formats.json")
    assert made["onnx_int8"] == "ptq" and made["tflite_int8"] == made["int8_choice"]["shipped"]
    copy = tmp_path / "ptq"
    shutil.copytree(run, copy)
    cfg = build_config({"int8_source": "ptq", "parity_inputs": 200, "client_inputs": 0},
                       base=from_yaml_file(copy / "config.yaml"))
    report = export(copy, tflite=["int8"], cfg=cfg)
    assert [r["made_from"] for r in report["rows"] if not r.get("kept")] == ["ptq"]   # the others: kept rows
    assert rundir.read_json(copy / "export" / "formats.json")["tflite_int8"] == "ptq"
    no_qat = tmp_path / "no_qat"
    shutil.copytree(trained_run.run_dir, no_qat)
    r = run_cli("export", no_qat, "--tflite", "int8", "--int8-source", "qat")
    assert r.returncode == 2 and "no QAT model" in r.stderr
    r = run_cli("export", no_qat, "--tflite", "int8", "--int8-granularity", "per-tnesor")
    assert r.returncode == 2 and "per-tnesor" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("export", no_qat, "--tflite", "int8", "--int8-io", "int4")
    assert r.returncode == 2 and "int4" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("export", run, "--tflite", "int8", "--int8-source", "qat", "--int8-granularity", "per-tensor")
    assert r.returncode == 2 and "per-channel" in r.stderr
