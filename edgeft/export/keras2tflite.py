"""Keras model -> TFLite bytes, one function per kind; shared by `qat` (which compares the QAT and
the PTQ int8 files) and `export` (which writes and gates them).

The bytes returned are the bare converter output: export adds the metadata (labels, input
contract) afterwards.
"""
from __future__ import annotations

import hashlib
import weakref

import numpy as np

from edgeft._keras import tf
from edgeft.core.errors import UserError
from edgeft.core.logs import captured
from edgeft.core.progress import Progress, record

IO_TYPES = {"uint8": tf.uint8, "int8": tf.int8}


class _Serving(tf.Module):
    """The model's inference as one traced function, its variables tracked: what the converter
    needs, without tf_keras' own SavedModel serialization of every layer."""

    def __init__(self, model):
        super().__init__()
        self.variables_ = list(model.variables)
        spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name=model.input_names[0])
        self.serve = tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)


def _converter(model):
    """A TFLiteConverter for the Keras model, through a SavedModel of its one serving function.

    `from_keras_model` saves the model with tf_keras' legacy SavedModel serialization, which traces
    every layer's call functions: measured here on MobileNetV2 alpha 0.35 at 32 px, 32.5 s against
    9.7 s this way (the machine busy; 70 % of from_keras_model's time was that serialization), with
    byte-identical output, the same tensor names (serving_default_image) and the same dynamic batch.
    The temporary SavedModel lives as long as the converter."""
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="edgeft-tflite-")
    serving = _Serving(model)
    tf.saved_model.save(serving, tmp.name, signatures=serving.serve.get_concrete_function())
    conv = tf.lite.TFLiteConverter.from_saved_model(tmp.name)
    conv._edgeft_saved_model = tmp   # noqa: SLF001 - removed when the converter is
    return conv


def _convert(conv) -> bytes:
    """The converter's C++ lines (`fully_quantize: 0, ...`, MLIR notes) go to edgeft's log, not the console."""
    with captured("tflite_converter", loggers=("tensorflow",), fd2=True):
        return conv.convert()


def tflite_float(model) -> bytes:
    return _convert(_converter(model))


def tflite_fp16(model) -> bytes:
    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return _convert(conv)


def tflite_dynamic(model) -> bytes:
    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]   # int8 weights, float activations
    return _convert(conv)


def full_range_images(like: np.ndarray) -> np.ndarray:
    """An all-0 and an all-255 image: calibration then always covers every pixel value, whatever
    the data set (a dark folder would otherwise clip bright pixels of the raw-pixel input)."""
    shape = (1,) + like.shape[1:]
    return np.concatenate([np.zeros(shape, np.float32), np.full(shape, 255.0, np.float32)])


def quantized_converter(model, rep_images: np.ndarray, io: str | None = "uint8", granularity: str = "per-channel",
                        ops: tuple[str, ...] = ("TFLITE_BUILTINS_INT8",), label: str = "tflite_int8"):
    """A TFLiteConverter set up for post-training quantization, calibrated on `rep_images` (plus an
    all-0 and an all-255 image): what `tflite_int8` converts, and what the per-layer error report
    (edgeft.quantize.int8_report) hands to TensorFlow's QuantizationDebugger. `ops`: names of
    tf.lite.OpsSet members (e.g. EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8 for 16x8);
    `io`: a key of IO_TYPES, or None for float input and output."""
    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    images = np.concatenate([full_range_images(rep_images), np.asarray(rep_images, np.float32)])

    def representative():   # the converter calibrates between the first request and the last
        import time

        start = time.monotonic()
        with Progress(f"{label}: calibrating on representative images", len(images)) as bar:
            for img in images:
                yield [img[None]]
                bar.update()
        record(f"calibrate {label}", time.monotonic() - start)

    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [getattr(tf.lite.OpsSet, name) for name in ops]
    if io is not None:
        conv.inference_input_type = IO_TYPES[io]
        conv.inference_output_type = IO_TYPES[io]
    if granularity == "per-tensor":
        conv._experimental_disable_per_channel = True   # noqa: SLF001 - the converter's only switch for it
    return conv


def _is_qat(model) -> bool:
    return any(type(layer).__name__.startswith("Quantize") for layer in model.layers)   # tfmot's wrappers


def quantize_calibrated(calibrated: bytes, io: str | None, granularity: str, keep_float=(),
                        numeric_verify: bool = False) -> bytes:
    """MLIR's quantizer on a calibrated model, as the converter runs it after calibrating (its
    `_quantize`: `mlir_quantize` with the I/O types and per-channel switch, `fully_quantize` left off
    as there: the I/O types set it): every op integer, or with `keep_float` the ops writing those
    tensors left float, between a DEQUANTIZE and a QUANTIZE. Checked on the quick tier's model: the same outputs as
    `converter.convert()` for uint8 / int8 I/O, per-channel and per-tensor (the flatbuffer 1 KB smaller:
    its layout, not its tensors, ops or metadata). `numeric_verify` with io None: the
    QuantizationDebugger's instrumented model (its own call), which the per-layer report reads."""
    from tensorflow.lite.python import convert

    types = IO_TYPES[io] if io is not None else tf.float32
    with captured("tflite_converter", loggers=("tensorflow",), fd2=True):
        return convert.mlir_quantize(calibrated, disable_per_channel=granularity == "per-tensor",
                                     fully_quantize=False, input_data_type=types, output_data_type=types,
                                     enable_numeric_verify=numeric_verify,
                                     **({"denylisted_nodes": list(keep_float)} if keep_float else {}))


# model -> {(weights, images, io, granularity): calibrated bytes}; one entry a model (the last asked)
_CALIBRATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibrated_model(model, rep_images: np.ndarray, io: str | None = "uint8", granularity: str = "per-channel",
                     label: str = "tflite_int8") -> bytes:
    """The float model with the converter's calibration statistics (`_experimental_calibrate_only`),
    the input of MLIR's quantizer: what `tflite_mixed` and the per-layer report
    (edgeft.quantize.int8_report) quantize. Calibrating is the whole cost of a conversion (measured on
    the quick tier's model: 4.0 s calibrating, 0.05 s quantizing), and the same model, weights and
    images give the same bytes (checked: twice, and under either op set), so it is made once a
    process: the report and every mixed candidate of one export calibrate once."""
    key = (hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())).hexdigest(),
           hashlib.sha256(np.ascontiguousarray(rep_images, np.float32).tobytes()).hexdigest(), io, granularity)
    memo = _CALIBRATED.get(model)
    if memo is None or key not in memo:
        conv = quantized_converter(model, rep_images, io, granularity, ops=("TFLITE_BUILTINS_INT8", "TFLITE_BUILTINS"),
                                   label=label)
        conv._experimental_calibrate_only = True   # noqa: SLF001 - calibrated model, quantized by the caller
        memo = _CALIBRATED[model] = {key: _convert(conv)}
    return memo[key]


def tflite_int8(model, rep_images: np.ndarray, io: str = "uint8", granularity: str = "per-channel") -> bytes:
    """Full integer: integer input and output, integer-only kernels (checked after conversion).

    For a QAT model the trained ranges are used as they are: the representative images only
    calibrate what the QAT model leaves without a range (the converter never overrides a
    fake-quant range; `range_mismatches` checks it). With io=uint8 the raw pixels map exactly
    (scale 1, zero point 0). Per-tensor: every quantized op's weights checked to have one scale."""
    if _is_qat(model):   # its fake-quant ranges go through the converter's own path
        data = _convert(quantized_converter(model, rep_images, io, granularity))
    else:   # calibrated once, shared with the per-layer report and the mixed candidates of recovery
        data = quantize_calibrated(calibrated_model(model, rep_images, io, granularity), io, granularity)
    float_ops = float_ops_in_tflite(data)
    if float_ops:
        raise UserError(f"int8 TFLite is not fully integer: float tensors in {', '.join(sorted(set(float_ops)))}")
    if granularity == "per-tensor":
        several = per_channel_tensors(data)
        if several:
            raise UserError(f"int8 TFLite asked per-tensor has per-channel scales in {len(several)} tensor(s), first "
                            f"{several[0]}: the converter did not honour per-tensor quantization")
    return data


def tflite_mixed(model, rep_images: np.ndarray, keep_float: list[str], io: str = "uint8",
                 granularity: str = "per-channel") -> bytes:
    """The int8 file with the ops that write `keep_float` (tensor names, as the per-layer report's
    QuantizationDebugger names them) left in float, between a DEQUANTIZE and a QUANTIZE: the
    converter calibrates as for `tflite_int8`, then its MLIR quantizer runs with those nodes
    denylisted (what QuantizationDebugger's `denylisted_nodes` does, here with the file's integer
    input and output). The other ops are checked integer-only, per-tensor where asked. The
    calibration is `calibrated_model`'s, shared with the report and the other mixed candidates."""
    data = quantize_calibrated(calibrated_model(model, rep_images, io, granularity, label="tflite_mixed"),
                               io, granularity, keep_float)
    if granularity == "per-tensor":
        several = per_channel_tensors(data)
        if several:
            raise UserError(f"mixed TFLite asked per-tensor has per-channel scales in {several[0]}")
    return data


def per_channel_tensors(data: bytes) -> list[str]:
    """Names of the tensors quantized with more than one scale (per-channel weights and their
    biases; TFLite quantizes activations per tensor): none in a per-tensor file."""
    from ai_edge_litert.interpreter import Interpreter

    return [t["name"] for t in Interpreter(model_content=data).get_tensor_details()
            if len(t["quantization_parameters"]["scales"]) > 1]


def float_ops_in_tflite(data: bytes) -> list[str]:
    """Names of ops that read or write a float tensor (empty for a full-integer model)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interp.get_tensor_details()}
    bad = []
    for op in interp._get_ops_details():   # noqa: SLF001 - the only op-level view LiteRT offers
        tensors = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if any(dtypes[i].kind == "f" for i in tensors if i in dtypes):
            bad.append(op["op_name"])
    return bad


def weight_scale_counts(data: bytes) -> dict[str, int]:
    """Op name -> most scales any of its int8 weight tensors has (1 = per-tensor)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    details = {t["index"]: t for t in interp.get_tensor_details()}
    out: dict[str, int] = {}
    for op in interp._get_ops_details():   # noqa: SLF001
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        weights = details.get(int(op["inputs"][1]))
        if weights is not None:
            n = len(weights["quantization_parameters"]["scales"])
            out[op["op_name"]] = max(out.get(op["op_name"], 0), n)
    return out
