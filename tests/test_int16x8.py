"""Issue 30 item 5: the 16x8 TFLite format (int16 activations, int8 weights, float32 I/O), opt-in
(`--tflite int16x8`): built by LiteRT's 16x8 mode, judged on its own tier (the floor rule), golden
vectors the device script verifies, in the client matrix (MediaPipe with its metadata, TensorFlow
Lite Micro). docs/export.md "16x8"."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeft.core.config import ParityConfig, build_config, from_yaml_file


def test_16x8_is_opt_in_and_a_search_target():
    from edgeft.core.formats import select_formats
    from edgeft.search.space import TARGETS

    assert "tflite_int16x8" not in {f.name for f in select_formats(None, None)}     # not a default file
    assert [f.filename for f in select_formats(["int16x8"], None)] == ["model_int16x8.tflite"]
    assert "tflite_int16x8" in {f.name for f in select_formats(["all"], None)}
    assert TARGETS["tflite-int16x8"].filename == "model_int16x8.tflite"


def test_the_16x8_tier_is_judged_on_its_floor():
    from edgeft.core.tiers import TIERS, Floor, judge

    assert TIERS["int16x8"].floor and TIERS["int16x8"].accuracy_drop
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 3)
    y = rng.integers(0, 3, len(groups))
    src = np.full((len(y), 3), 0.05)
    src[np.arange(len(y)), y] = 0.9
    flipped = src.copy()
    flipped[:9] = np.roll(flipped[:9], 1, axis=1)     # 5 % of the clear inputs disagree
    floor = Floor.measure("LiteRT reference kernels", src, src, groups, np.ones(len(y), bool))
    j = judge("int16x8", flipped, src, y, groups, ParityConfig(max_accuracy_drop=10), floor)
    assert [f.code for f in j.failures] == ["agreement"] and j.required_clear_agreement == pytest.approx(0.99)
    assert judge("int16x8", src, src, y, groups, ParityConfig(), floor).passed


def test_the_device_quantizes_int16_symmetrically():
    """TFLite's int16 is symmetric (zero point 0, -32767..32767); pixels 0-255 survive the round trip."""
    from edgeft.device import dequantize, quantize

    scale = 255.0 / 32767
    q = quantize(np.array([-1e6, -1.0, 0.0, 255.0, 1e6]), np.int16, scale, 0)
    assert q.tolist() == [-32767, -128, 0, 32767, 32767]
    pixels = np.arange(256, dtype=np.float32)
    assert np.array_equal(np.round(dequantize(quantize(pixels, np.int16, scale, 0), scale, 0)), pixels)


@pytest.mark.slow   # a 16x8 conversion, its floor and four client cells: over the quick tier's 10 s
def test_16x8_export_gate_golden_vectors_and_clients(quick_run, tmp_path):
    """`--tflite int16x8` on the quick tier's run: the file is 16x8 inside with float32 I/O, judged on
    its tier against the floor of the same run, its golden vectors pass the device script (and a
    vector moved past the tier's bound fails), MediaPipe reads its metadata, TensorFlow Lite Micro runs it."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeft.device import verify
    from edgeft.pipeline.exporter import export

    result, _ = quick_run
    run = tmp_path / "run"
    shutil.copytree(result.run_dir, run, ignore=shutil.ignore_patterns("export", ".export-*", ".lock*"))
    cfg = build_config({"client_inputs": 30}, base=from_yaml_file(run / "config.yaml"))
    report = export(run, tflite=["int16x8"], cfg=cfg)
    out = run / "export"
    model = out / "model_int16x8.tflite"

    interp = Interpreter(model_path=str(model))
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    assert (np.dtype(i["dtype"]), np.dtype(o["dtype"])) == (np.float32, np.float32)    # raw pixels in, probabilities out
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()   # noqa: SLF001
    for op in ops:
        kinds = {np.dtype(tensors[k]["dtype"]).name for k in list(op["inputs"]) + list(op["outputs"]) if k >= 0}
        if op["op_name"] == "CONV_2D":
            assert {"int16", "int8"} <= kinds and "float32" not in kinds, kinds   # int16 activations, int8 weights
        elif op["op_name"] not in ("QUANTIZE", "DEQUANTIZE"):
            assert "float32" not in kinds, (op["op_name"], kinds)

    [row] = report["rows"]
    assert (row["format"], row["tier"], row["passed"]) == ("tflite_int16x8", "int16x8", True)
    assert row["floor"]["how"] == "LiteRT reference kernels"
    assert row["required_clear_agreement"] == pytest.approx(row["floor"]["clear_agreement"] - cfg.parity.floor_slack / 100)
    assert row["max_abs_diff"] < 0.15   # closer to float than the int8 tier's golden bound

    cells = {c["client"]: c for c in report["clients"] if c["file"] == model.name}
    assert cells["mediapipe"]["runs"] and cells["mediapipe"]["names_match"] is True
    tflm = cells["tflm"]   # measured: TFLM runs it; its int16 FULLY_CONNECTED / SOFTMAX round apart from LiteRT's
    assert tflm["runs"] and tflm["error"] is None and tflm.get("identical_to") is None
    assert tflm["agreement_with_reference"] == 1.0

    golden = json.loads((out / "golden" / "expected.json").read_text())
    assert golden["files"][model.name]["tier"] == "int16x8" and golden["files"][model.name]["max_abs_diff"] == 0.05
    assert verify(model, out / "golden")["passed"]
    entry = golden["files"][model.name]
    outputs = np.asarray(entry["outputs"])
    outputs[0] += np.where(np.arange(outputs.shape[1]) == outputs[0].argmax(), -0.06, 0.03)
    entry["outputs"] = outputs.tolist()
    (out / "golden" / "expected.json").write_text(json.dumps(golden))
    assert not verify(model, out / "golden")["passed"]


@pytest.mark.parametrize("target", ["tflite-int8", "tflite-int16x8"])
def test_search_takes_per_tensor_and_16x8_targets(target, image_folder, tmp_path, monkeypatch):
    """`edgeft search --target tflite-int16x8` and `--int8-granularity per-tensor`: the candidates' runs
    (and their untrained target files) get the granularity through the search's training values."""
    import edgeft.search.runner as runner
    from edgeft.cli.app import main

    seen = []
    monkeypatch.setattr(runner, "search", seen.append)
    assert main(["search", str(image_folder), "--out", str(tmp_path / "s"), "--target", target,
                 "--int8-granularity", "per-tensor"]) == 0
    [o] = seen
    assert o.target == target and o.train_values["int8_granularity"] == "per-tensor"
    assert build_config(o.train_values).export.int8_granularity == "per-tensor"
