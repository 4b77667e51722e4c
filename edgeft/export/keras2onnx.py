"""ONNX files for any ONNX runtime: float (tf2onnx) and int8 (ONNX Runtime static quantization).

Both builders return the file as bytes and need no ExportContext, so pipeline/exporter.py, benchmarks and
tests share them. Every file has

- a symbolic batch axis (dim_param "batch") on its input and output: batch 1 and batch N run;
- the labels (key `labels`, a JSON list) and the input contract (keys `input_*`) in
  `metadata_props`, so a device needs nothing beside the file;
- a graph simplified by onnxslim where the simplified graph gives the same outputs
  (max |diff| <= SIMPLIFY_ATOL) as tf2onnx's, else tf2onnx's graph unchanged.

The int8 default (DEFAULT_INT8) was chosen by measurement (tools/bench_onnx_int8.py, MobileNetV2 1.0
at 224 px, ORT 1.32, 1 thread, AVX-512 VNNI x86): QDQ with uint8 activations, int8 per-channel
weights and the 3-channel stem conv left in float ran 1.96x and 2.09x faster than float in two
quiet runs (int8 activations, edgeft's int8 before: 1.13x); it passes the int8 parity tier.
OPENCV_INT8 is the variant OpenCV 5.0's DNN module computes correctly (slow under ORT on x86).
Only numpy (and edgeft.core.errors, .logs) is imported at module level; onnx, onnxruntime, tf2onnx (with TensorFlow) and onnxslim
where they are used.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.core.errors import UserError
from edgeft.core.logs import captured

INPUT_NAME = "image"
BATCH_DIM = "batch"
SIMPLIFY_ATOL = 1e-5
LABELS_KEY = "labels"
QUANT_KEY = "quantization"
SIMPLIFIED_KEY = "graph_simplified"   # "onnxslim <version>" or "no: <why>"


def input_contract(image_size: int) -> dict[str, str]:
    """The metadata keys that say what the input is (every edgeft model takes the same)."""
    return {"input_name": INPUT_NAME, "input_layout": "NHWC", "input_color": "RGB",
            "input_range": "0-255", "input_dtype": "float32",
            "input_height": str(image_size), "input_width": str(image_size),
            "output": "probabilities"}


def labels_metadata(labels: list[str]) -> dict[str, str]:
    return {LABELS_KEY: json.dumps(list(labels))}


def read_metadata(model: bytes | str | Path) -> dict[str, str]:
    """metadata_props of an ONNX file (bytes or path) as a dict."""
    import onnx

    proto = (onnx.load_from_string(model) if isinstance(model, bytes)
             else onnx.load(str(model), load_external_data=False))
    return {p.key: p.value for p in proto.metadata_props}


# ---------------------------------------------------------------- float
def onnx_float_bytes(model, image_size: int, opset: int, metadata: dict[str, str],
                     check_images: np.ndarray | None = None, simplify: bool = True) -> bytes:
    """The float Keras model as ONNX (tf2onnx), dynamic batch, simplified where that is exact.

    `metadata` (e.g. labels_metadata(labels)) is stored with the input contract; its keys win.
    `check_images` (float32 NHWC 0-255) are the inputs the simplified graph must reproduce;
    None: a few seeded synthetic images (noise and smooth gradients). simplify=False keeps
    tf2onnx's graph as it is.
    """
    import tf2onnx

    from edgeft._keras import tf

    spec = (tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name=INPUT_NAME),)
    # tf2onnx's chatter and TensorFlow's C++ lines go to edgeft's log; its error records (each with a
    # traceback) are kept off the console too, and said in one line
    with captured("tf2onnx", loggers=("tf2onnx",), fd2=True, keep_errors=False), _tf2onnx_errors() as errors:
        try:
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
        except Exception as e:  # tf2onnx raises ValueError, KeyError, AssertionError... on what it cannot convert
            errors.insert(0, f"{type(e).__name__}: {e}")
    if errors:
        first = (errors[0].strip().splitlines() or ["?"])[0][:300]
        raise UserError(f"tf2onnx could not convert the model to ONNX opset {opset}: {first}"
                              + (f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else "")
                              + "; try another --opset (edgeft's default: 17)")
    _symbolic_batch(proto)
    note = "no: not asked"
    if simplify:
        if check_images is None:
            check_images = synthetic_images(4, image_size)
        proto, note = simplified(proto, np.asarray(check_images, np.float32)[:8])
    _canonical_names(proto)
    return _with_metadata(proto, {**input_contract(image_size), SIMPLIFIED_KEY: note, **metadata}).SerializeToString()


def _canonical_names(proto) -> None:
    """Same model, same bytes. tf2onnx numbers the names it makes up with a global counter and
    keeps whichever of several merged constants' names a set yields first; onnxslim names fused
    weights the same way. Both vary with Python's hash seed from process to process. So every
    node, intermediate tensor and initializer is renamed by its position in the (deterministic)
    node order: node `<OpType>_<i>`, its outputs `<node>:<k>`, initializers `<consumer>/in<k>`.
    The graph's input and output names (the file's contract) stay as they are."""
    keep = {v.name for v in proto.graph.input} | {v.name for v in proto.graph.output}
    rename: dict[str, str] = {}
    inits = {init.name for init in proto.graph.initializer}
    for i, node in enumerate(proto.graph.node):
        node.name = f"{node.op_type}_{i}"
        for k, name in enumerate(node.input):
            if name in inits and name not in rename and name not in keep:
                rename[name] = f"{node.name}/in{k}"
        for k, name in enumerate(node.output):
            if name and name not in keep:
                rename[name] = f"{node.name}:{k}"
    for node in proto.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for init in proto.graph.initializer:
        init.name = rename.get(init.name, init.name)
    for info in proto.graph.value_info:
        info.name = rename.get(info.name, info.name)


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n float32 NHWC images 0-255: half uniform noise, half smooth colour gradients."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(rng.uniform(0, 255, (size, size, 3)))
        else:
            a, b, c = rng.uniform(0, 1, (3, 3))
            out.append(255 * np.stack([(a[k] * xx + b[k] * yy + c[k]) % 1.0 for k in range(3)], -1))
    return np.stack(out).astype(np.float32)


def _symbolic_batch(proto) -> None:
    """First dim of every graph input and output -> dim_param "batch" (tf2onnx writes unk__N)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM


def batch_dims(model: bytes) -> list:
    """[first dim of each graph input and output]: a str when symbolic, an int when fixed."""
    import onnx

    g = onnx.load_from_string(model).graph
    return [(d.dim_param if d.HasField("dim_param") else d.dim_value)
            for v in list(g.input) + list(g.output) for d in v.type.tensor_type.shape.dim[:1]]


def run_onnx(model: bytes, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Output 0 of an ONNX model (bytes) under ONNX Runtime on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, np.float32)})[0]


def simplified(proto, check_images: np.ndarray):
    """(graph, note): onnxslim's graph when it reproduces the original on check_images
    within SIMPLIFY_ATOL, else the original and why not."""
    try:
        import onnxslim
    except ImportError:
        return proto, "no: onnxslim not installed"
    original = proto.SerializeToString()
    try:
        import onnx

        with captured("onnxslim", loggers=("onnxslim",)):
            slim = onnxslim.slim(onnx.load_from_string(original))
        if slim is None:
            return proto, "no: onnxslim returned nothing"
        _symbolic_batch(slim)
        want = run_onnx(original, check_images)
        got = run_onnx(slim.SerializeToString(), check_images)
    except Exception as e:   # a simplifier bug must never break an export: keep tf2onnx's graph
        return proto, f"no: onnxslim failed ({type(e).__name__}: {str(e).strip()[:120]})"
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if got.shape == want.shape else float("inf")
    if diff > SIMPLIFY_ATOL:
        return proto, f"no: simplified graph differs by {diff:.1e}"
    del slim.metadata_props[:]
    return slim, f"onnxslim {onnxslim.__version__} (max |diff| <= {SIMPLIFY_ATOL:.0e} on the check images)"


# ---------------------------------------------------------------- int8
CALIBRATION_BATCH = 16   # images per calibration run (one at a time took 3x as long beside the export's other work)


@contextlib.contextmanager
def _calibration_not_spinning():
    """ONNX Runtime's calibration session without busy-waiting threads: quantize_static makes that
    session itself (onnxruntime.quantization.calibrate.CalibraterBase.create_inference_session, no
    options passed through), and its default thread pool spins between ops; beside the export's
    other work on the same cores (the client matrix's processes, the gate's runs) the spinning took
    the time the calibration needed. Only the session option `session.intra_op.allow_spinning` is
    added (ONNX Runtime's documented key); the ranges computed are the same."""
    import onnxruntime
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self):
        opts = onnxruntime.SessionOptions()
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                          providers=self.execution_providers)

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


@dataclass(frozen=True)
class Int8Variant:
    """One way to call onnxruntime.quantization.quantize_static."""
    name: str
    fmt: str = "qdq"                 # "qdq" or "qoperator"
    activation: str = "uint8"        # "uint8" or "int8"
    weight: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    float_stem: bool = False         # keep the input's first conv (and what feeds it) in float
    ort_preopt: bool = False         # let quant_pre_process run ORT's graph optimizer first
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.fmt.upper()}, activations {self.activation}, weights {self.weight} "
                f"{'per-channel' if self.per_channel else 'per-tensor'}"
                + (", reduce_range" if self.reduce_range else "")
                + (", float stem" if self.float_stem else "")
                + (", ORT-optimized before quantization" if self.ort_preopt else "")
                + "".join(f", {k}={v}" for k, v in sorted(self.extra.items())))


# names: format (qdq / qop = QOperator), activation and weight types (u8 / s8), per-channel (pc) or
# per-tensor (pt) weights, then options: rr reduce_range, fs float stem, preopt ORT pre-optimizer
INT8_VARIANTS: dict[str, Int8Variant] = {v.name: v for v in (
    Int8Variant("qdq_s8s8_pc", activation="int8"),                  # edgeft's int8 before issue 10
    Int8Variant("qdq_s8s8_pt", activation="int8", per_channel=False),
    Int8Variant("qdq_u8s8_pc"),
    Int8Variant("qdq_u8s8_pt", per_channel=False),
    Int8Variant("qdq_u8s8_pc_rr", reduce_range=True),
    Int8Variant("qdq_u8s8_pc_fs", float_stem=True),                 # the default until issue 16
    # the default: uint8 x int8 kernels on x86 without VNNI (AVX2) add pairs of products in int16,
    # which saturates with 8-bit weights; 7-bit weights (reduce_range) cannot overflow. Measured on
    # the suite's model under ONNX Runtime here (AVX2): accuracy 6.4 points below float without it,
    # 0.3 with it; the fused kernels agreed with the unfused graph on 85 % vs 99.7 % of clear inputs
    Int8Variant("qdq_u8s8_pc_fs_rr", float_stem=True, reduce_range=True),
    Int8Variant("qdq_u8s8_pt_fs", per_channel=False, float_stem=True),
    Int8Variant("qdq_u8s8_pc_fs_preopt", float_stem=True, ort_preopt=True),
    Int8Variant("qdq_u8u8_pc", weight="uint8"),                     # the one OpenCV 5.0 runs right
    Int8Variant("qdq_u8u8_pt", weight="uint8", per_channel=False),
    Int8Variant("qop_s8s8_pc", fmt="qoperator", activation="int8"),
    Int8Variant("qop_u8s8_pc", fmt="qoperator"),
    Int8Variant("qop_u8s8_pc_fs", fmt="qoperator", float_stem=True),
    Int8Variant("qop_u8s8_pt", fmt="qoperator", per_channel=False),
    Int8Variant("qop_u8u8_pt", fmt="qoperator", weight="uint8", per_channel=False),
)}
DEFAULT_INT8 = "qdq_u8s8_pc_fs_rr"
OPENCV_INT8 = "qdq_u8u8_pc"


def onnx_int8_bytes(float_onnx: bytes, rep_images: np.ndarray, metadata: dict[str, str],
                    variant: str | Int8Variant = DEFAULT_INT8, keep_float: tuple[str, ...] = (),
                    calibration: str = "MinMax") -> bytes:
    """Static int8 quantization of a float ONNX file, calibrated (MinMax) on rep_images
    (float32 NHWC 0-255). The float file's metadata is kept; `metadata` is added over it.
    `keep_float`: names of further nodes left in float (the per-layer error report's confirmation);
    `calibration`: an onnxruntime.quantization.CalibrationMethod name (MinMax, Entropy, Percentile)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    v = INT8_VARIANTS[variant] if isinstance(variant, str) else variant
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    images = np.asarray(rep_images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise UserError(f"int8 calibration needs a non-empty NHWC image batch, got shape {images.shape}")

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            # batches, not single images: the MinMax calibrator reduces each tensor to its min / max
            # over all it is given, so the ranges are the same; 200 calls become 13
            # (MinMax only: the histogram calibrators stack each run's outputs and need equal batches)
            step = CALIBRATION_BATCH if calibration == "MinMax" else 1
            self.items = iter([{name: images[i:i + step]} for i in range(0, len(images), step)])
            self.start = None

        def get_next(self):   # ORT calibrates between the first request and the last
            import time

            from edgeft.core.progress import record

            self.start = self.start or time.monotonic()
            item = next(self.items, None)
            if item is None and self.start:
                record("calibrate onnx_int8", time.monotonic() - self.start)
                self.start = 0.0
            return item

    with tempfile.TemporaryDirectory(prefix="edgeft-onnx-") as tmp:
        src, pre, out = Path(tmp) / "float.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_onnx)
        # ORT's optimizer would fuse MatMul + Add into Gemm, and OpenCV cannot load a QDQ Gemm
        # ("bufidx >= 0 in function 'argTensor'"); ORT optimizes the graph at load time anyway
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, skip_optimization=not v.ort_preopt)
        pre_proto = onnx.load(str(pre))
        name = pre_proto.graph.input[0].name
        exclude = (stem_nodes(pre_proto) if v.float_stem else []) + list(keep_float) or None
        # ORT logs a warning per BatchNorm vector ("Axis 1 is out-of-range") through the root logger
        # ... and its histogram calibrators print ("Collecting tensor data and making histogram ...")
        with captured("onnxruntime", loggers=("onnxruntime",), root_from=("onnxruntime",), stdout=True), \
                _calibration_not_spinning():
            quantize_static(str(pre), str(out), Reader(name),
                            quant_format=QuantFormat.QDQ if v.fmt == "qdq" else QuantFormat.QOperator,
                            per_channel=v.per_channel, reduce_range=v.reduce_range,
                            activation_type=types[v.activation], weight_type=types[v.weight],
                            nodes_to_exclude=exclude, calibrate_method=CalibrationMethod[calibration],
                            extra_options=dict(v.extra) or None)
        proto = onnx.load(str(out))
    _symbolic_batch(proto)
    how = f"{v.name}: {v.describe()}" + (f", {calibration} calibration" if calibration != "MinMax" else "")
    meta = {**read_metadata(float_onnx), QUANT_KEY: how, **metadata}
    return _with_metadata(proto, meta).SerializeToString()


def stem_nodes(proto) -> list[str]:
    """Names of the nodes from the graph input up to the first Conv and its activation: the
    3-channel stem convolution is slower in int8 than in float under ORT (its GEMM depth is
    only 3 x k x k), and the preprocessing before it (x / 127.5 - 1) gains nothing either."""
    nodes = list(proto.graph.node)
    first = next((i for i, n in enumerate(nodes) if n.op_type == "Conv"), None)
    if first is None:
        return []
    names = [n.name for n in nodes[:first + 1]]
    conv_out = nodes[first].output[0]
    after = [n for n in nodes[first + 1:] if conv_out in n.input]
    if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
        names.append(after[0].name)
    return names


# ---------------------------------------------------------------- helpers
@contextlib.contextmanager
def _tf2onnx_errors():
    """The messages of tf2onnx's error records while converting (a list, filled as they come), kept
    off the console: tf2onnx logs each node it fails on with a traceback and goes on, writing a
    file no runtime loads."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:   # the rest: edgeft's log (`captured` beside it)
                messages.append(record.getMessage())

    log = logging.getLogger("tf2onnx")
    handler = Keep()
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _with_metadata(proto, metadata: dict[str, str]):
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    return proto
