"""ONNX files for more than ONNX Runtime: dynamic batch, metadata, simplified graph, the int8
default against the int8 parity tier, and OpenCV DNN reading the float file."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from edgeft.core.config import from_yaml_file
from edgeft.core.tiers import judge
from edgeft.data.datasets import parity_inputs
from edgeft.export import keras2onnx as ox
from edgeft.nn.runtime import OnnxRunner, read_labels
from edgeft.run import run_splits


@pytest.fixture(scope="module")
def onnx_files(trained_run):
    """The trained tiny run exported once: tf2onnx's graph, the simplified graph, the int8 default."""
    cfg = from_yaml_file(trained_run.run_dir / "config.yaml")
    splits = run_splits(cfg)
    size = cfg.data.image_size
    meta = ox.labels_metadata(splits.classes)
    raw = ox.onnx_float_bytes(trained_run.model, size, cfg.export.opset, meta, simplify=False)
    slim = ox.onnx_float_bytes(trained_run.model, size, cfg.export.opset, meta,
                               check_images=splits.train.x[:4].astype(np.float32))
    rep = splits.train.x.astype(np.float32)     # every training image: what export calibrates on here
    int8 = ox.onnx_int8_bytes(slim, rep, meta)
    # the gate's own inputs: the validation images and their copies (the gate judges nothing on fewer
    # than 30 inputs, and the tiny run has 12 validation images)
    inputs = parity_inputs(splits.val, 120, cfg.train.seed)
    x = inputs.x
    ref = np.asarray(trained_run.model.predict(x, batch_size=64, verbose=0), np.float32)
    return SimpleNamespace(cfg=cfg, splits=splits, size=size, raw=raw, slim=slim, int8=int8, rep=rep,
                           x=x, ref=ref, y=inputs.y, groups=inputs.source)


def test_batch_axis_is_symbolic_and_batches_agree(onnx_files):
    x = onnx_files.x[:7]
    assert len(x) == 7
    for name in ("raw", "slim", "int8"):
        data = getattr(onnx_files, name)
        assert ox.batch_dims(data) == [ox.BATCH_DIM, ox.BATCH_DIM], name   # input and output
        one = np.concatenate([ox.run_onnx(data, img[None]) for img in x])
        five, seven = ox.run_onnx(data, x[:5]), ox.run_onnx(data, x)
        assert one.shape == (7, 3) and seven.shape == (7, 3), name
        np.testing.assert_allclose(five, one[:5], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(seven, one, atol=1e-5, err_msg=name)


def test_float_file_matches_keras(onnx_files):
    probs = ox.run_onnx(onnx_files.slim, onnx_files.x)
    assert float(np.max(np.abs(probs - onnx_files.ref))) <= onnx_files.cfg.parity.float_atol


def test_metadata_holds_labels_and_input_contract(onnx_files, tmp_path):
    classes = onnx_files.splits.classes
    for name in ("slim", "int8"):
        meta = ox.read_metadata(getattr(onnx_files, name))
        assert json.loads(meta["labels"]) == classes, name
        assert meta["input_layout"] == "NHWC" and meta["input_color"] == "RGB", name
        assert meta["input_range"] == "0-255" and meta["input_dtype"] == "float32", name
        assert int(meta["input_height"]) == int(meta["input_width"]) == onnx_files.size, name
        # what the contract says is what the file's graph takes
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(getattr(onnx_files, name))
        runner = OnnxRunner(path)
        assert runner.input.name == meta["input_name"] and runner.input.type == "tensor(float)"
        assert runner.input_hw == (onnx_files.size, onnx_files.size)
        assert runner.metadata()["labels"] == meta["labels"]
        assert read_labels(path) == classes     # no labels.txt beside it: read from the file
    assert ox.read_metadata(onnx_files.int8)[ox.QUANT_KEY].startswith(ox.DEFAULT_INT8)


def test_simplified_graph_is_kept_and_matches(onnx_files):
    import onnx

    note = ox.read_metadata(onnx_files.slim)[ox.SIMPLIFIED_KEY]
    assert note.startswith("onnxslim"), note
    assert ox.read_metadata(onnx_files.raw)[ox.SIMPLIFIED_KEY].startswith("no")
    nodes = [len(onnx.load_from_string(d).graph.node) for d in (onnx_files.raw, onnx_files.slim)]
    assert nodes[1] < nodes[0]     # onnxslim really changed the graph
    raw, slim = ox.run_onnx(onnx_files.raw, onnx_files.x), ox.run_onnx(onnx_files.slim, onnx_files.x)
    assert float(np.max(np.abs(raw - slim))) <= ox.SIMPLIFY_ATOL


def test_simplifier_falls_back_when_outputs_differ(onnx_files, monkeypatch):
    """A simplified graph that changes the outputs is not kept."""
    import onnx
    import onnxslim

    def broken_slim(model):
        init = next(t for t in model.graph.initializer if len(t.dims) == 4)   # a conv kernel
        w = onnx.numpy_helper.to_array(init) * 1.5
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        return model

    monkeypatch.setattr(onnxslim, "slim", broken_slim)
    proto = onnx.load_from_string(onnx_files.raw)
    kept, note = ox.simplified(proto, onnx_files.x[:4])
    assert note.startswith("no: simplified graph differs"), note
    assert kept is proto


def test_int8_default_passes_the_int8_tier(onnx_files):
    p, y = onnx_files.cfg.parity, onnx_files.y
    probs = ox.run_onnx(onnx_files.int8, onnx_files.x)
    assert judge("int8", probs, onnx_files.ref, y, onnx_files.groups, p).failures == []
    assert len(onnx_files.int8) < 0.5 * len(onnx_files.slim)


def test_int8_default_graph_is_what_the_variant_says(onnx_files):
    """QDQ, uint8 activations, int8 per-channel weights, every conv but the float stem quantized."""
    import onnx
    from onnx import numpy_helper

    v = ox.INT8_VARIANTS[ox.DEFAULT_INT8]
    g = onnx.load_from_string(onnx_files.int8).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    made_by = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert not any(n.op_type.startswith("QLinear") for n in g.node)      # QDQ, not QOperator
    quantized = [n for n in convs if n.input[1] in made_by and made_by[n.input[1]].op_type == "DequantizeLinear"]
    float_convs = [n for n in convs if n not in quantized]
    assert len(float_convs) == (1 if v.float_stem else 0) and (not float_convs or float_convs[0] is convs[0])
    for n in quantized:
        w, scale = (inits[i] for i in made_by[n.input[1]].input[:2])
        x_zero_point = inits[made_by[n.input[0]].input[2]]
        assert w.dtype == np.dtype(v.weight) and x_zero_point.dtype == np.dtype(v.activation)
        if v.reduce_range:   # 7-bit weights: no int16 saturation in u8 x s8 kernels without VNNI
            assert np.abs(w.astype(np.int32)).max() <= 64
        assert scale.size == (w.shape[0] if v.per_channel else 1)
    with pytest.raises(KeyError):
        ox.onnx_int8_bytes(onnx_files.slim, onnx_files.rep, {}, variant="no_such_variant")


def _cv2():
    # OpenCV 4.12 gets this 32 px model wrong (max |diff| 0.15 vs ORT: its depthwise conv on a 1x1
    # feature map) and cannot load the int8 files; 5.0 runs them (measured for issue 10)
    return pytest.importorskip("cv2", minversion="5.0")


def _opencv_probs(net, x):
    rows = []
    for img in x:                    # the NHWC float32 RGB 0-255 array as it is, batch 1
        net.setInput(img[None])
        rows.append(np.asarray(net.forward()).reshape(-1))
    return np.stack(rows)


def test_opencv_dnn_reads_the_float_file(onnx_files, tmp_path):
    cv2 = _cv2()
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_files.slim)
    net = cv2.dnn.readNetFromONNX(str(path))
    probs = _opencv_probs(net, onnx_files.x)
    ort = ox.run_onnx(onnx_files.slim, onnx_files.x)
    assert probs.shape == ort.shape
    assert (probs.argmax(-1) == ort.argmax(-1)).all()
    assert float(np.max(np.abs(probs - ort))) <= onnx_files.cfg.parity.float_atol


def test_opencv_dnn_loads_the_int8_default(onnx_files, tmp_path):
    """The int8 file once failed to load in OpenCV ("bufidx >= 0 in function 'argTensor'": a
    QDQ Gemm that ORT's pre-optimizer fused from MatMul + Add). It loads and runs now; its
    numbers under OpenCV 5.0 are not right (see OPENCV_INT8), so only the shape is checked."""
    cv2 = _cv2()
    path = tmp_path / "model_int8.onnx"
    path.write_bytes(onnx_files.int8)
    probs = _opencv_probs(cv2.dnn.readNetFromONNX(str(path)), onnx_files.x[:2])
    assert probs.shape == (2, 3)


def test_opencv_int8_variant_passes_the_int8_tier_in_opencv(onnx_files, tmp_path):
    cv2 = _cv2()
    path = tmp_path / "model_int8_opencv.onnx"
    path.write_bytes(ox.onnx_int8_bytes(onnx_files.slim, onnx_files.rep, {}, variant=ox.OPENCV_INT8))
    probs = _opencv_probs(cv2.dnn.readNetFromONNX(str(path)), onnx_files.x)
    p, y = onnx_files.cfg.parity, onnx_files.y
    assert judge("int8", probs, onnx_files.ref, y, onnx_files.groups, p).failures == []
