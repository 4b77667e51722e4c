"""EfficientNet-Lite0 with its real ImageNet weights through the whole pipeline, on 60 real photos
(tests/data/fashion): finetune -> QAT -> export -> gate -> verify as a device does (conftest.lite_run)."""
from __future__ import annotations

import json

import numpy as np

CHANCE = 1 / 3


def test_lite0_learns_real_photos_and_its_int8_file_passes_the_gate(lite_run):
    result, report, run = lite_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"head", "qat"} <= set(metrics)
    # learning, not existence: at least twice chance on held-out photos, float and QAT alike
    assert metrics["head"]["val_accuracy"] >= 2 * CHANCE, metrics["head"]
    assert metrics["qat"]["val_accuracy"] >= 2 * CHANCE, metrics["qat"]
    rows = {r["file"]: r for r in report["rows"]}
    int8 = rows["model_int8.tflite"]
    assert int8["passed"], int8
    assert int8["accuracy"] >= 2 * CHANCE, int8


def test_lite0_int8_file_verifies_as_on_a_device(lite_run):
    from edgeft import device

    _, _, run = lite_run
    export = run / "export"
    result = device.verify(export / "model_int8.tflite", export / "golden")
    assert result["passed"] and result["same_file_as_export"], result["failures"]
    assert result["inputs"] and all(i["top1"] == i["expected_top1"] for i in result["inputs"])
    # and the file's accuracy on the held-out photos, decoded and run by the device's own code
    import edgeft

    val = edgeft.Run.open(run).splits.val
    x = np.stack([device.load_image(p, 64) for p in val.paths]).astype(np.float32)
    probs = device.open_runner(export / "model_int8.tflite").predict(x)
    assert len(val.y) >= 15 and float(np.mean(probs.argmax(-1) == val.y)) >= 2 * CHANCE
