"""The quick tier (`pytest -m "not slow"`): one tiny run through every stage, once.

`quick_run` (conftest.py) trains 2 + 1 epochs and 1 QAT epoch through `edgeft.finetune` and
exports three formats through the gate; the tests here read what it made and run the commands
that take a finished export (benchmark, evaluate, the client matrix, TFLite Micro's op list), so
every module of the package runs at least once without the slow session fixtures.
"""
from __future__ import annotations

import json

import numpy as np

CHANCE = 1 / 3   # three classes


def test_quick_run_trains_runs_qat_and_ships_gated_files(quick_run):
    import edgeft
    from edgeft import device

    result, report = quick_run
    run = result.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"head", "finetune", "qat"} <= set(metrics)          # QAT ran after training, by the orchestrator
    # it learned, well above chance, float and QAT alike
    assert metrics["finetune"]["val_accuracy"] >= 2 * CHANCE, metrics["finetune"]
    assert metrics["qat"]["val_accuracy"] >= 2 * CHANCE, metrics["qat"]
    # the model.keras that shipped is the one measured: its validation accuracy, computed here, is the recorded one
    handle = edgeft.Run.open(run)
    val = handle.splits.val
    probs = edgeft.load_model(handle.model_path).predict(val.x.astype(np.float32), verbose=0)
    assert float(np.mean(probs.argmax(-1) == val.y)) == metrics["finetune"]["val_accuracy"]
    report_md = (run / "report.md").read_text()   # written after QAT, with the numbers of metrics.json
    for stage in ("finetune", "qat"):
        assert f"| {stage} | {metrics[stage]['val_accuracy']:.4f} |" in report_md, stage
    rows = {r["file"]: r for r in report["rows"]}
    assert set(rows) == {"model_float.tflite", "model_int8.tflite", "model.onnx"}
    assert all(r["passed"] for r in rows.values()), rows
    man = json.loads((run / "export" / "manifest.json").read_text())
    assert set(man["files"]) == set(rows)
    for name in rows:   # the golden vectors replay on every shipped file, by the device script's code
        verified = device.verify(run / "export" / name, run / "export" / "golden")
        assert verified["passed"] and verified["same_file_as_export"], (name, verified["failures"])


def test_quick_run_opens_and_its_files_run(quick_run, image_folder):
    import edgeft
    from edgeft import device
    from edgeft.export.manifest import check_manifest
    from edgeft.nn.runtime import open_runner, read_labels
    from edgeft.verify.bench import benchmark
    from edgeft.verify.evaluate import evaluate

    result, _ = quick_run
    run = edgeft.Run.open(result.run_dir)
    model = edgeft.load_model(run.model_path)
    x = run.splits.val.x[:4]
    keras_probs = model.predict(x.astype(np.float32), verbose=0)
    probs = open_runner(run.export_dir / "model_float.tflite").predict(x)
    assert np.allclose(probs, keras_probs, atol=1e-4)
    assert check_manifest(run.path, run.export_dir) == []
    bench = benchmark(run, threads=(1,), runs=2, warmup=1, limit=6)   # really timed, every runner kind
    for row in bench["rows"]:
        for timed in ("invoke_ms", "end_to_end_ms"):
            assert all(0 < v["p50"] <= v["max"] for v in row[timed].values()), (row["format"], timed)
    # evaluate's accuracy is the file's own: the same images decoded and run here give the same number
    onnx = run.export_dir / "model.onnx"
    ev = evaluate(onnx, image_folder, include_trained=True)   # all 72, the trained-on images too
    labels = read_labels(onnx)
    paths = sorted(image_folder.rglob("*.png"))
    y = np.asarray([labels.index(p.parent.name) for p in paths])
    pixels = np.stack([device.load_image(p, 32) for p in paths]).astype(np.float32)
    mine = float(np.mean(device.open_runner(onnx).predict(pixels).argmax(-1) == y))
    assert ev["n"] == len(paths) == 72 and ev["accuracy"] == mine
    assert ev["accuracy"] >= 2 * CHANCE, ev["accuracy"]


def test_benchmark_reports_the_device_timers_by_name(quick_run, monkeypatch):
    """`edgeft benchmark` times with the device script's `time_runner` (a stand-in here returns
    numbers by call), and its JSON and table name the invoke and end-to-end latencies apart."""
    from edgeft import device
    from edgeft.verify.bench import benchmark

    result, _ = quick_run
    calls = []

    def stand_in(runner, pool, runs, warmup):
        calls.append(type(runner).__name__)
        k = len(calls)
        stats = lambda v: {s: v for s in ("mean", "p50", "p90", "p95", "p99", "min", "max", "std")}   # noqa: E731
        return {"invoke_ms": stats(10.0 * k), "end_to_end_ms": stats(10.0 * k + 3.0),
                "outliers_removed": {"invoke_ms": 0, "end_to_end_ms": 1}}

    monkeypatch.setattr(device, "time_runner", stand_in)
    bench = benchmark(result.run_dir, threads=(1,), runs=2, warmup=1, limit=6)
    rows = {r["format"]: r for r in bench["rows"]}
    assert set(rows) == {"keras", "tflite_float", "tflite_int8", "onnx_float"} and len(calls) == 4
    for k, name in enumerate(r["format"] for r in bench["rows"]):   # in the order they were timed
        key = "tf_default" if name == "keras" else "1"
        assert rows[name]["invoke_ms"][key]["p50"] == 10.0 * (k + 1)
        assert rows[name]["end_to_end_ms"][key]["p50"] == 10.0 * (k + 1) + 3.0
        assert "latency_ms" not in rows[name]
    md = (result.run_dir / "benchmark.md").read_text()
    assert "invoke p50 ms @1t" in md and "end-to-end p50 ms @1t" in md
    k = [r["format"] for r in bench["rows"]].index("tflite_int8") + 1
    line = next(ln for ln in md.splitlines() if ln.startswith("| tflite_int8 |"))
    assert f"| {10.0 * k:.3f} |" in line and f"| {10.0 * k + 3.0:.3f} |" in line, line


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
