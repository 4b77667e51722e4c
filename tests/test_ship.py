"""Only gated files ship: export/ is replaced in one step, failures go to export/failed/, and
export/manifest.json names every shipped file by its sha256 (issue: trust what ships)."""
import json
import shutil

from conftest import run_cli
from edgeft.core import rundir
from edgeft.export.manifest import check_manifest, manifest_entry, sha256_file
from edgeft.pipeline.exporter import open_staging, publish


def test_manifest_names_every_shipped_file(exported_run):
    run, report = exported_run
    man = rundir.read_json(run / "export" / "manifest.json")
    shipped = {r["file"] for r in report["rows"] if r["passed"]}
    assert set(man["files"]) == shipped
    for name, entry in man["files"].items():
        assert entry["sha256"] == sha256_file(run / "export" / name)
        assert entry["size_bytes"] == (run / "export" / name).stat().st_size
        assert all(p["passed"] for p in entry["parity"])
    i8 = man["files"]["model_int8.tflite"]["input"]
    assert (i8["dtype"], i8["scale"], i8["zero_point"], i8["layout"], i8["color"]) == ("uint8", 1.0, 0, "NHWC", "RGB")
    assert man["files"]["model_int8.tflite"]["int8_source"] in ("ptq", "qat")
    assert man["toolchain"]["tensorflow"] and man["toolchain"]["ai-edge-litert"]
    assert len(man["calibration"]["sha256"]) == 64 and man["parity_inputs"]["n"] >= 1000
    assert man["model_keras_sha256"] == sha256_file(run / "model.keras")
    assert check_manifest(run, run / "export") == []
    assert manifest_entry(run / "export" / "model_int8.onnx") == (True, "ok")


def test_edited_files_are_caught(exported_run, tmp_path, image_folder):
    run, _ = exported_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    f = copy / "export" / "model_float.tflite"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF   # one byte of the appended metadata archive: the model still runs
    f.write_bytes(bytes(data))
    r = run_cli("parity", copy)
    assert r.returncode == 2 and "model_float.tflite changed after export" in r.stderr, r.stderr[-500:]
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("edgeft")]) == 1
    photo = next((image_folder / "six").glob("*.png"))
    r = run_cli("predict", f, photo, "--top-k", "1")   # refused, as the device script refuses it
    assert r.returncode == 1 and "changed after export" in r.stderr and "--allow-unverified" in r.stderr
    r = run_cli("predict", f, photo, "--top-k", "1", "--allow-unverified")
    assert r.returncode == 0 and "warning" in r.stderr and "changed after export" in r.stderr
    f.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))   # restored
    assert check_manifest(copy, copy / "export") == []
    (copy / "model.keras").write_bytes((copy / "model.keras").read_bytes() + b"\0")
    assert any("model.keras was replaced" in p for p in check_manifest(copy, copy / "export"))


def test_a_failing_file_leaves_its_shipping_name(exported_run, tmp_path):
    run, _ = exported_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p.name for p in (copy / "export").iterdir()}
    r = run_cli("export", copy, "--tflite", "float", "--float-atol", "1e-12", "--parity-inputs", "100",
                "--client-inputs", "0")
    assert r.returncode == 1, r.stderr[-1500:]
    assert "failed" in r.stderr and "model_float.tflite" in r.stderr
    out = copy / "export"
    assert not (out / "model_float.tflite").exists()
    assert (out / "failed" / "model_float.tflite").is_file()
    rows = json.loads((out / "failed" / "parity.json").read_text())["rows"]
    assert [row["file"] for row in rows] == ["model_float.tflite"] and not rows[0]["passed"]
    man = rundir.read_json(out / "manifest.json")
    assert "model_float.tflite" not in man["files"] and "model_int8.tflite" in man["files"]
    assert before - {"model_float.tflite"} <= {p.name for p in out.iterdir()}   # the rest still ships
    assert not [p for p in copy.iterdir() if p.name.startswith(".export")]


def test_an_interrupted_export_leaves_the_previous_one(exported_run, tmp_path):
    run, _ = exported_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out = copy / "export"
    listing = sorted(p.name for p in out.iterdir())
    stage = open_staging(copy)               # an export that dies after building into its stage...
    (stage / "model_float.tflite").write_bytes(b"half-written")
    assert sorted(p.name for p in out.iterdir()) == listing   # ...has not touched export/
    assert check_manifest(copy, out) == []
    out.rename(copy / ".export-old-1")       # ...or dies between publish's two renames
    stage2 = open_staging(copy)              # the next export restores export/ and clears leftovers
    assert sorted(p.name for p in out.iterdir()) == listing
    assert [p.name for p in copy.iterdir() if p.name.startswith(".export")] == [stage2.name]
    publish(copy, stage2)
    assert sorted(p.name for p in out.iterdir()) == listing and check_manifest(copy, out) == []


def test_export_check_reproduces_every_shipped_file(exported_run, tmp_path, monkeypatch):
    """Exporting the same run again gives byte-identical files (metadata zip times fixed, ONNX
    names made independent of Python's hash seed, no run name embedded), and --check catches a file
    that differs. The run checked is a copy under another name: reproducible means the same bytes for
    the same model and settings wherever the run lives (issue 28: the TFLite metadata held its name)."""
    import pytest

    import edgeft.pipeline.exporter as ex
    from edgeft.core.errors import ParityError

    run, _ = exported_run
    copy = tmp_path / "copied-and-renamed"
    assert copy.name != run.name
    shutil.copytree(run, copy)
    # the session's export, cut down to what `edgeft export RUN --tflite int8 --onnx float` ships (the
    # int8 TFLite file from PTQ or QAT, and ONNX): --check then re-exports only those, which keeps this
    # quick, and the files it compares with are the ones the session's full export made
    keep = {"model_int8.tflite", "model.onnx"}
    man_path = copy / "export" / "manifest.json"
    man = json.loads(man_path.read_text())
    assert keep < set(man["files"])
    for name in set(man["files"]) - keep:
        (copy / "export" / name).unlink()
        del man["files"][name]
    man_path.write_text(json.dumps(man))
    assert check_manifest(copy, copy / "export") == []
    rows = ex.check_export(copy)   # in-process: the same code `edgeft export RUN --check` runs
    assert set(rows) == keep
    assert all(r["again"] == r["shipped"] for r in rows.values())

    def export_with_one_byte_off(target, **kw):   # stands in for a converter that is not deterministic
        target = getattr(target, "path", target)    # check_export hands over the copy as a Run
        shutil.copytree(copy / "export", target / "export")
        f = target / "export" / "model_int8.tflite"
        data = f.read_bytes()
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

    monkeypatch.setattr(ex, "export", export_with_one_byte_off)
    with pytest.raises(ParityError, match="model_int8.tflite"):
        ex.check_export(copy)
    monkeypatch.undo()
    man = json.loads(man_path.read_text())
    man["files"]["model.onnx"]["sha256"] = "0" * 64   # a manifest edited by hand
    man_path.write_text(json.dumps(man))
    r = run_cli("export", copy, "--check")
    assert r.returncode == 2 and "model.onnx changed after export" in r.stderr


def test_device_script_checks_the_manifest(exported_run, tmp_path, image_folder):
    import subprocess
    import sys

    from conftest import REPO

    run, _ = exported_run
    for name in ("model_int8.tflite", "manifest.json"):
        shutil.copy(run / "export" / name, tmp_path / name)
    script = [sys.executable, str(REPO / "tools" / "edgeft_device.py"), "predict", str(tmp_path / "model_int8.tflite"),
              str(next((image_folder / "six").glob("*.png")))]
    r = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    data = bytearray((tmp_path / "model_int8.tflite").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "model_int8.tflite").write_bytes(bytes(data))
    r = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "changed after export" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "manifest.json").unlink()   # no manifest beside it: nothing to check against
    r = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "error" not in r.stderr
