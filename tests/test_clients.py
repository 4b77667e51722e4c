"""The client matrix: every exported file under every client that takes it (LiteRT default and
reference kernels, MediaPipe ImageClassifier, TensorFlow Lite Micro, ONNX Runtime, OpenCV DNN),
each cell "loads, top-1 agreement" or the client's one-line error."""
import struct
import subprocess
import sys

import numpy as np
import pytest

from edgeft.verify.clients import (
    CLIENTS,
    CLOSE_TOLERANCE,
    FEW_INPUTS,
    REFERENCE,
    TFLM_INPUTS,
    Client,
    MatrixRun,
    client_matrix,
    float_arithmetic,
    client_warnings,
    matrix_markdown,
)
from edgeft.nn.runtime import OnnxRunner, TFLiteRunner


def _cell(rows, file, client):
    (row,) = [r for r in rows if r["file"] == file and r["client"] == client]
    return row


@pytest.fixture(scope="module")
def matrix(exported_run, trained_run):
    """The matrix the export's parity gate ran on RUN/export/ (parity.json's "clients"): the first
    --client-inputs parity inputs, against the float Keras model. Reused, not run again: each cell
    is a process."""
    from edgeft.core.config import from_yaml_file
    from edgeft.data.datasets import gate_inputs
    from edgeft.run import run_splits
    from edgeft.quantize.int8_choice import keras_probs

    run, report = exported_run
    cfg = from_yaml_file(run / "config.yaml")
    splits = run_splits(cfg)
    inputs = gate_inputs(splits.val, cfg)
    x = inputs.x[:cfg.parity.client_inputs]
    ref = keras_probs(trained_run.model, x)
    rows = report["clients"]
    assert rows and {r["n"] for r in rows if r["client"] not in ("tflm", "litert_ref")} == {len(x)} \
        and len(x) >= 10, "the export ran no client matrix"
    return run / "export", x, ref, list(splits.classes), rows


def test_every_file_goes_to_every_client_of_its_format(matrix):
    export, x, _, _, rows = matrix
    files = sorted(p.name for p in export.iterdir() if p.suffix in (".tflite", ".onnx"))
    assert {"model_float.tflite", "model_int8.tflite", "model.onnx", "model_int8.onnx"} <= set(files)
    for f in files:
        want = {c.name for c in CLIENTS if f.endswith(c.suffix) and c.applies(export / f)}
        assert {r["client"] for r in rows if r["file"] == f} == want, f
    # TensorFlow Lite Micro takes the full-integer file only, and gives LiteRT's reference kernels' outputs
    assert [r["file"] for r in rows if r["client"] == "tflm"] == ["model_int8.tflite"]
    tflm = _cell(rows, "model_int8.tflite", "tflm")
    assert tflm["n"] == min(len(x), TFLM_INPUTS) and tflm["identical_to"] == "litert_ref"
    assert tflm["identical_inputs"] == tflm["n"]
    # the reference clients' numbers are what edgeft's own runners give on the same inputs
    for f in files:
        runner = TFLiteRunner(export / f) if f.endswith(".tflite") else OnnxRunner(export / f)
        row = _cell(rows, f, REFERENCE["." + f.rsplit(".", 1)[1]])
        assert row["loads"] and row["runs"] and row["error"] is None and row["n"] == len(x)
        assert row["top1_agreement"] == pytest.approx(np.mean(runner.predict(x).argmax(1) == matrix[2].argmax(1)))


def test_reference_kernels_run_few_inputs_checked_close_only_on_float_arithmetic_files(matrix):
    """Issue 26 item 6: LiteRT's reference kernels run FEW_INPUTS inputs of every file; on the float
    and fp16 files (float32 arithmetic, XNNPACK's in another order) each output is checked within
    CLOSE_TOLERANCE of XNNPACK's; on the int8 and dynamic-range files (integer and hybrid kernels,
    which differ from XNNPACK's on near ties) there is no such check: the int8 file's statistical
    comparison with XNNPACK is the gate's floor, and TFLite Micro must equal these outputs."""
    export, x, _, _, rows = matrix
    assert float_arithmetic(export / "model_float.tflite") and float_arithmetic(export / "model_fp16.tflite")
    assert not float_arithmetic(export / "model_int8.tflite") and not float_arithmetic(export / "model_dynamic.tflite")
    for f in ("model_float.tflite", "model_fp16.tflite"):
        ref = _cell(rows, f, "litert_ref")
        assert ref["n"] == min(len(x), FEW_INPUTS) < len(x), ref
        assert ref["close_to"] == "litert" and ref["close_tolerance"] == CLOSE_TOLERANCE, ref
        assert ref["close_inputs"] == ref["n"] and ref["close_max_abs_diff"] <= CLOSE_TOLERANCE, ref
    for f in ("model_int8.tflite", "model_dynamic.tflite"):
        ref = _cell(rows, f, "litert_ref")
        assert ref["n"] == min(len(x), FEW_INPUTS) < len(x) and "close_to" not in ref, ref
        assert ref["top1_agreement"] is not None and ref["error"] is None, ref


def test_the_gate_provides_the_litert_cells_and_an_unprovided_cell_still_runs(matrix):
    """Issue 26 item 6: the export's matrix takes its LiteRT (default) cells from the gate's own run of
    each .tflite file (the same runtime, the same first inputs) instead of running them again; a cell
    the caller never provides is run by the matrix itself when its rows are asked for."""
    export, x, ref, classes, rows = matrix
    for f, client in (("model_float.tflite", "litert"), ("model_int8.tflite", "litert"),
                      ("model.onnx", "onnxruntime"), ("model_int8.onnx", "onnxruntime")):
        cell = _cell(rows, f, client)
        assert cell["outputs_from"] == "the parity gate's run of this file" and cell["n"] == len(x), cell
    base = {c.name: c for c in CLIENTS}
    run = MatrixRun(x[:4], ref[:4], classes, clients=(base["litert"],), isolate=False, provided=("litert",))
    run.add(export / "model_float.tflite")
    run.add(export / "model_int8.tflite")
    run.provide("model_int8.tflite", "litert", np.full((4, len(classes)), 1.0 / len(classes), np.float32))
    got = {r["file"]: r for r in run.rows()}
    assert "outputs_from" not in got["model_float.tflite"] and got["model_float.tflite"]["seconds"] is not None
    assert got["model_float.tflite"]["top1_agreement"] == pytest.approx(
        np.mean(TFLiteRunner(export / "model_float.tflite").predict(x[:4]).argmax(1) == ref[:4].argmax(1)))
    assert got["model_int8.tflite"]["outputs_from"] and got["model_int8.tflite"]["max_abs_diff"] == pytest.approx(
        float(np.max(np.abs(1.0 / len(classes) - ref[:4]))))


def _litert_off_by(path, x):
    """LiteRT's reference kernels with every score moved by 1e-3: a kernel that computes another function."""
    from edgeft.verify.clients import litert_reference

    out = litert_reference(path, x)
    probs = out.probs + np.float32(1e-3)
    return type(out)(probs, probs.argmax(-1))


def test_a_reference_kernel_that_is_not_close_is_reported(matrix):
    export, x, ref, classes, _ = matrix
    base = {c.name: c for c in CLIENTS}
    off = Client("litert_ref", "LiteRT (reference kernels)", ".tflite", ("ai_edge_litert",), "ai-edge-litert",
                 _litert_off_by, few_for=float_arithmetic, close_to="litert")
    rows = client_matrix(export, x[:FEW_INPUTS + 2], ref[:FEW_INPUTS + 2], classes, clients=(base["litert"], off),
                         isolate=False, files=[export / "model_float.tflite"])
    cell = _cell(rows, "model_float.tflite", "litert_ref")
    assert cell["n"] == FEW_INPUTS and cell["close_inputs"] == 0 and cell["close_max_abs_diff"] > CLOSE_TOLERANCE
    (warning,) = [w for w in client_warnings(rows) if "litert_ref" in w]
    assert f"by more than {CLOSE_TOLERANCE:g} on {FEW_INPUTS} of {FEW_INPUTS} inputs" in warning
    assert f"within {CLOSE_TOLERANCE:g} of LiteRT (default, XNNPACK) on 0/{FEW_INPUTS}" in matrix_markdown(rows)


def test_mediapipe_loads_every_tflite_file_and_agrees_with_litert(matrix):
    """Issue 10's required check: MediaPipe Tasks ImageClassifier loads each .tflite file export
    writes, names the classes from the file's metadata, and its top category is LiteRT's top-1."""
    pytest.importorskip("mediapipe")
    export, x, _, classes, rows = matrix
    tflite = sorted(p.name for p in export.glob("*.tflite"))
    assert len(tflite) == 4 and len(x) >= 10
    for f in tflite:
        row = _cell(rows, f, "mediapipe")
        assert row["loads"] and row["runs"] and row["error"] is None, row
        assert row["category_names"] == classes and row["names_match"], row
        assert row["reference"] == "litert" and row["agreement_with_reference"] >= 0.99, row
        litert = _cell(rows, f, "litert")
        # same top-1 as LiteRT on >= 99 %: their agreements with Keras can differ by at most 1 %
        assert abs(row["top1_agreement"] - litert["top1_agreement"]) <= 0.01 + 1e-9, (row, litert)


def test_opencv_loads_the_float_onnx_with_onnxruntime_answers(matrix):
    pytest.importorskip("cv2")
    _, x, _, _, rows = matrix
    row = _cell(rows, "model.onnx", "opencv")
    assert row["loads"] and row["runs"] and row["error"] is None and row["n"] == len(x)
    assert row["reference"] == "onnxruntime" and row["agreement_with_reference"] == 1.0
    assert row["top1_agreement"] == _cell(rows, "model.onnx", "onnxruntime")["top1_agreement"]
    assert row["max_abs_diff"] < 1e-4   # a float file: the same probabilities, not just the same class
    # the int8 ONNX file is in the matrix under OpenCV too, whatever OpenCV makes of it
    int8 = _cell(rows, "model_int8.onnx", "opencv")
    assert int8["error"] is not None or 0.0 <= int8["top1_agreement"] <= 1.0


def test_markdown_has_a_row_per_file_and_a_column_per_client(matrix):
    rows = matrix[-1]
    md = matrix_markdown(rows)
    header = next(ln for ln in md.splitlines() if ln.startswith("| file |"))
    assert header.count("|") == 2 + len(CLIENTS)
    for f in {r["file"] for r in rows}:
        (line,) = [ln for ln in md.splitlines() if ln.startswith(f"| {f} |")]
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cells) == len(CLIENTS)
        for c, text in zip(CLIENTS, cells):
            row = [r for r in rows if r["file"] == f and r["client"] == c.name]
            if not row:
                assert text == "-"
            elif row[0]["error"] is None:
                assert text.startswith(f"{row[0]['top1_agreement']:.1%}")


# ---------------------------------------------------------------- files a client cannot take
def _tflite_schema():
    return pytest.importorskip("mediapipe.tasks.metadata.schema_py_generated")


def _with_int8_input(data: bytes) -> bytes:
    """The uint8-I/O int8 file with its input tensor declared int8 (what --int8-io int8 gives
    MediaPipe): the tensor's `type` byte rewritten in place."""
    fb = _tflite_schema()
    buf = bytearray(data)
    g = fb.Model.GetRootAsModel(buf, 0).Subgraphs(0)
    t = g.Tensors(g.Inputs(0))
    assert t.Type() == fb.TensorType.UINT8
    buf[t._tab.Pos + t._tab.Offset(6)] = fb.TensorType.INT8   # Tensor.type: field 1, vtable slot 6
    assert fb.Model.GetRootAsModel(buf, 0).Subgraphs(0).Tensors(g.Inputs(0)).Type() == fb.TensorType.INT8
    return bytes(buf)


def _with_softmax_input_scale(data: bytes, scale: float) -> bytes:
    """The int8 file with its logits' quantization scale set to `scale` in place. Below about
    1.5e-8 the softmax kernels' Prepare fails a TFLITE_CHECK and aborts the process."""
    fb = _tflite_schema()
    buf = bytearray(data)
    model = fb.Model.GetRootAsModel(buf, 0)
    g = model.Subgraphs(0)
    code = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
            for i in range(model.OperatorCodesLength())]
    (op,) = [g.Operators(i) for i in range(g.OperatorsLength())
             if code[g.Operators(i).OpcodeIndex()] == fb.BuiltinOperator.SOFTMAX]
    q = g.Tensors(op.Inputs(0)).Quantization()
    struct.pack_into("<f", buf, q._tab.Vector(q._tab.Offset(8)), scale)   # QuantizationParameters.scale[0]
    assert fb.Model.GetRootAsModel(buf, 0).Subgraphs(0).Tensors(op.Inputs(0)).Quantization().Scale(0) == \
        np.float32(scale)
    return bytes(buf)


def _aborts_litert(path) -> bool:
    """Whether LiteRT alone (no edgeft) dies loading the file: the ground truth for the matrix."""
    code = ("from ai_edge_litert.interpreter import Interpreter; "
            f"Interpreter(model_path={str(path)!r}).allocate_tensors()")
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=120).returncode < 0


def _fails(a, b):
    raise AssertionError("never called: the client is not installed")


GHOST = Client("ghost", "Ghost runtime", ".onnx", ("edgeft_no_such_module",), "ghost-runtime", _fails)


def test_files_a_client_cannot_load_are_cells_with_one_line_errors(matrix, tmp_path):
    export, x, ref, classes, _ = matrix
    bad = tmp_path / "bad"
    bad.mkdir()
    int8 = (export / "model_int8.tflite").read_bytes()
    onnx = (export / "model.onnx").read_bytes()
    (bad / "truncated.tflite").write_bytes(int8[:len(int8) // 2])     # an interrupted download
    (bad / "truncated.onnx").write_bytes(onnx[:len(onnx) // 2])
    (bad / "int8_input.tflite").write_bytes(_with_int8_input(int8))
    (bad / "aborts.tflite").write_bytes(_with_softmax_input_scale(int8, 1e-9))
    rows = client_matrix(bad, x[:4], ref[:4], classes, clients=CLIENTS + (GHOST,),
                         files=[bad / "truncated.tflite", bad / "truncated.onnx"])
    # the other two files under the clients they are about (each cell is a process: keep it short)
    rows += client_matrix(bad, x[:4], ref[:4], classes, files=[bad / "int8_input.tflite", bad / "aborts.tflite"],
                          clients=tuple(c for c in CLIENTS if c.name in ("litert", "mediapipe")))
    for r in rows:   # every failure is one line, and a failure is never also a result
        assert r["error"] is None or (r["error"].strip() and "\n" not in r["error"] and len(r["error"]) <= 260), r
        assert (r["error"] is None) == (r["top1_agreement"] is not None), r
    for f in ("truncated.tflite", "truncated.onnx"):
        cells = [r for r in rows if r["file"] == f]
        want = {"litert", "litert_ref", "mediapipe", "tflm"} if f.endswith(".tflite") else {"onnxruntime", "opencv"}
        assert {r["client"] for r in cells} >= want, cells
        for r in cells:
            assert not r["loads"] and r["error"], r
            if r["client"] != "ghost":
                assert r["error"].startswith("load: ") and str(bad) not in r["error"], r
    # a client package that is not there: a cell, not an exception
    ghost = _cell(rows, "truncated.onnx", "ghost")
    assert not ghost["loads"] and ghost["error"] == "not installed: pip install ghost-runtime"
    # MediaPipe takes uint8 or float32 input only; LiteRT runs the same file
    assert _cell(rows, "int8_input.tflite", "litert")["runs"]
    mp = _cell(rows, "int8_input.tflite", "mediapipe")
    assert not mp["loads"] and mp["error"].startswith("load: "), mp
    # a client that aborts the process is isolated in its own: this test process is still here
    crashed = _cell(rows, "aborts.tflite", "litert")
    if _aborts_litert(bad / "aborts.tflite"):
        assert not crashed["loads"] and "ended the process (signal SIG" in crashed["error"], crashed
    else:
        assert crashed["loads"], crashed
    md = matrix_markdown(rows)
    for k, r in enumerate([r for r in rows if r["error"]], 1):
        assert f"[{k}] {r['file']} / " in md and r["error"] in md
    warned = client_warnings(rows)
    assert all(any(w.startswith(f"{r['file']} under {r['client']}: {r['error']}") for w in warned)
               for r in rows if r["error"])
