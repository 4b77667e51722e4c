"""The quick tier (`pytest -m "not slow"`): one tiny run through every stage, once.

`quick_run` (conftest.py) trains 2 + 1 epochs and 1 QAT epoch through `edgeft.finetune` and
exports three formats through the gate; the tests here read what it made and run the commands
that take a finished export (benchmark, evaluate, the client matrix, TFLite Micro's op list), so
every module of the package runs at least once without the slow session fixtures.
"""
from __future__ import annotations

import json

import numpy as np


def test_quick_run_trains_runs_qat_and_ships_gated_files(quick_run):
    result, report = quick_run
    run = result.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"head", "finetune", "qat"} <= set(metrics)          # QAT ran after training, by the orchestrator
    assert (run / "model.keras").is_file() and (run / "report.md").is_file()
    assert "qat" in (run / "report.md").read_text().lower()   # the report was written after QAT
    rows = {r["file"]: r for r in report["rows"]}
    assert {"model_float.tflite", "model_int8.tflite", "model.onnx"} <= set(rows)
    assert rows["model_float.tflite"]["passed"] and rows["model.onnx"]["passed"]
    man = json.loads((run / "export" / "manifest.json").read_text())
    assert set(man["files"]) == {f for f, r in rows.items() if r["passed"]}
    assert (run / "export" / "golden").is_dir()


def test_quick_run_opens_and_its_files_run(quick_run, image_folder):
    import edgeft
    from edgeft.verify.bench import benchmark
    from edgeft.verify.evaluate import evaluate
    from edgeft.export.manifest import check_manifest
    from edgeft.nn.runtime import open_runner

    result, _ = quick_run
    run = edgeft.Run.open(result.run_dir)
    model = edgeft.load_model(run.model_path)
    x = run.splits.val.x[:4]
    keras_probs = model.predict(x.astype(np.float32), verbose=0)
    probs = open_runner(run.export_dir / "model_float.tflite").predict(x)
    assert np.allclose(probs, keras_probs, atol=1e-4)
    assert check_manifest(run.path, run.export_dir) == []
    bench = benchmark(run, threads=(1,), runs=2, warmup=1, limit=6)
    assert {r["format"] for r in bench["rows"]} >= {"keras", "tflite_float"}
    ev = evaluate(run.export_dir / "model.onnx", image_folder)
    assert 0.0 <= ev["accuracy"] <= 1.0


def test_quick_run_client_matrix_and_tflm_ops(quick_run):
    from edgeft.verify.clients import client_matrix
    from edgeft.export.tflm import flatbuffer_bytes, model_ops

    result, _ = quick_run
    run = result.run_dir
    import edgeft

    handle = edgeft.Run.open(run)
    x = handle.splits.val.x[:3]
    ref = handle.model.predict(x.astype(np.float32), verbose=0)
    rows = client_matrix(run / "export", x, ref, handle.splits.classes, limit=3,
                         files=[run / "export" / "model_float.tflite"])
    assert rows and all(r["file"] == "model_float.tflite" for r in rows)
    ops = model_ops(flatbuffer_bytes((run / "export" / "model_int8.tflite").read_bytes()))
    assert "CONV_2D" in ops
