"""tools/bench_quant.py RUN --files (issue 30 item 7, the fine-tuned rows): the --imagenet row set made
from a run's model, judged on the run's test split (not its validation split), rows in --json."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import REPO


def _bench_quant():
    spec = importlib.util.spec_from_file_location("bench_quant", REPO / "tools" / "bench_quant.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow   # ~20 s on the shared 2-core machine: converts and times one int8 file of quick_run
def test_files_mode_rows_are_the_imagenet_set_judged_on_the_test_split(quick_run, tmp_path, capsys):
    from edgeft.core.config import from_yaml_file
    from edgeft.nn.model import load_model
    from edgeft.quantize.int8_choice import keras_probs
    from edgeft.run import run_splits

    bq = _bench_quant()
    run = quick_run[0].run_dir
    cfg = from_yaml_file(run / "config.yaml")
    splits = run_splits(cfg, run)
    model = load_model(run / "model.keras")
    cal = np.zeros((4, 32, 32, 3), np.float32)
    # the row set (nothing made): the --imagenet files plus recovery (a)'s calibration sizes as given
    keys = [k for k, *_ in bq.quant_files(model, cal, 32, None, "uint8", [(16, lambda: cal)], slow_16x8=False)]
    assert keys == ["tflite float", "tflite int8 per-channel", "tflite int8 per-tensor",
                    "tflite int8 per-tensor, 16 images", "tflite int8 per-tensor, bias correction",
                    "tflite int8 per-tensor, equalized", "tflite int8 per-tensor, equalized + bias correction",
                    "tflite 16x8 per-channel", "onnx float", "onnx int8 per-channel", "onnx int8 per-tensor",
                    "onnx int8 per-tensor MinMax, 16 images", "onnx int8 per-tensor Entropy, 4 images",
                    "onnx int8 per-tensor Percentile, 4 images"]

    # one file made, judged and timed beside the Keras row; the JSON holds every row with its keys
    out = tmp_path / "files.json"
    assert bq.main([str(run), "--files", "--only", "tflite int8 per-tensor", "--runs", "10",
                    "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    n_test, n_val = len(splits.test), len(splits.val)
    assert n_test != n_val and got["test_n"] == n_test and got["val_n"] == n_val
    assert [r["file"] for r in got["rows"]] == ["keras float", "tflite int8 per-tensor"]
    y = np.asarray(splits.test.y)
    x = splits.test.read(np.arange(n_test)).astype(np.float32)
    float_acc = float(np.mean(keras_probs(model, x).argmax(-1) == y))
    assert got["rows"][0]["accuracy"] == float_acc and got["rows"][0]["agreement"] == 1.0
    for r in got["rows"]:
        assert {"file", "what", "size_bytes", "p50_ms", "accuracy", "accuracy_interval", "n", "n_clear",
                "agreement", "clear_agreement", "clear_agreement_interval"} <= set(r), r
        assert r["n"] == n_test
        lo, hi = r["accuracy_interval"]
        assert lo - 1e-9 <= r["accuracy"] <= hi + 1e-9
    int8 = got["rows"][1]
    assert int8["size_bytes"] > 0 and int8["p50_ms"] > 0 and len(int8["p50_rounds_ms"]) == 10
    printed = capsys.readouterr().out
    assert "| tflite int8 per-tensor | naive: converter PTQ" in printed and "goal (within 1.5)" not in printed
