"""Export a run to TFLite and ONNX, then prove every file agrees with Keras (parity gate).

Each format is a row of FORMATS (file name, exporter, parity tier); `export` loops over the rows
the user asked for. Every file is written atomically into RUN/export/ and the parity gate runs
on all of them before the command reports anything as done.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import rundir
from ._keras import keras, tf
from .config import EdgeftConfig, from_yaml_file
from .errors import UserError
from .model import load_model
from .runtime import LABELS_MEMBER

EXPORT_DIR = "export"


@dataclass
class ExportContext:
    """What every exporter may need, computed once."""
    run: Path
    cfg: EdgeftConfig
    model: keras.Model                   # float Keras model
    qat_model: keras.Model | None        # quantization-aware model, when QAT was run
    rep_images: np.ndarray               # float32 0-255, representative data for int8
    labels: list[str]
    cache: dict = field(default_factory=dict)

    @property
    def input_spec(self):
        size = self.cfg.data.image_size
        return (tf.TensorSpec((None, size, size, 3), tf.float32, name="image"),)


@dataclass(frozen=True)
class Format:
    name: str          # e.g. "tflite_int8"
    family: str        # "tflite" or "onnx": the CLI flag it belongs to
    flag: str          # value of --tflite / --onnx
    filename: str
    tier: str          # parity tier: "float", "fp16" or "int8"
    build: Callable[[ExportContext], bytes]


# ---------------------------------------------------------------- TFLite
def _converter(model):
    return tf.lite.TFLiteConverter.from_keras_model(model)


def tflite_with_labels(data: bytes, labels: list[str]) -> bytes:
    """The .tflite file with a zip archive holding labels.txt appended, as TFLite-metadata and
    MediaPipe files carry theirs: LiteRT ignores the trailing archive and any device reads the
    labels with Python's own `zipfile`, so the labels travel with the file."""
    buf = io.BytesIO(data)
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(LABELS_MEMBER, "\n".join(labels) + "\n")
    return buf.getvalue()


def _convert(conv, ctx: ExportContext) -> bytes:
    """Every TFLite file: converted, with the run's labels appended."""
    return tflite_with_labels(conv.convert(), ctx.labels)


def tflite_float(ctx: ExportContext) -> bytes:
    return _convert(_converter(ctx.model), ctx)


def tflite_fp16(ctx: ExportContext) -> bytes:
    conv = _converter(ctx.model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return _convert(conv, ctx)


def tflite_dynamic(ctx: ExportContext) -> bytes:
    conv = _converter(ctx.model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]   # int8 weights, float activations
    return _convert(conv, ctx)


def tflite_int8(ctx: ExportContext) -> bytes:
    """Full integer: int8 input and output, integer-only kernels; from the QAT model if any."""
    conv = _converter(ctx.qat_model if ctx.qat_model is not None else ctx.model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([img[None]] for img in ctx.rep_images)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    data = _convert(conv, ctx)   # LiteRT ignores the appended labels, so the check sees the model itself
    float_ops = float_ops_in_tflite(data)
    if float_ops:
        raise UserError(f"int8 TFLite is not fully integer: float tensors in {', '.join(sorted(set(float_ops)))}")
    return data


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


# ---------------------------------------------------------------- ONNX
def onnx_float(ctx: ExportContext) -> bytes:
    if "onnx_float" not in ctx.cache:
        import tf2onnx

        proto, _ = tf2onnx.convert.from_keras(ctx.model, input_signature=ctx.input_spec, opset=ctx.cfg.export.opset)
        ctx.cache["onnx_float"] = _with_labels(proto, ctx.labels).SerializeToString()
    return ctx.cache["onnx_float"]


def onnx_int8(ctx: ExportContext) -> bytes:
    """ORT static quantization (QDQ, per-channel) of the float ONNX, calibrated on the same
    representative images: tf2onnx writes float weights even for a QAT model."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.items = iter([{name: img[None]} for img in ctx.rep_images])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory(prefix="edgeft-onnx-") as tmp:
        src, pre, out = Path(tmp) / "float.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_float(ctx))
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        name = onnx.load(str(pre)).graph.input[0].name
        with _quiet_root_logger():   # ORT logs a warning per BatchNorm vector ("Axis 1 is out-of-range")
            quantize_static(str(pre), str(out), Reader(name), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return _with_labels(onnx.load(str(out)), ctx.labels).SerializeToString()


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _with_labels(proto, labels: list[str]):
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "labels", json.dumps(labels)
    return proto


FORMATS: tuple[Format, ...] = (
    Format("tflite_float", "tflite", "float", "model_float.tflite", "float", tflite_float),
    Format("tflite_fp16", "tflite", "fp16", "model_fp16.tflite", "fp16", tflite_fp16),
    Format("tflite_dynamic", "tflite", "dynamic", "model_dynamic.tflite", "fp16", tflite_dynamic),
    Format("tflite_int8", "tflite", "int8", "model_int8.tflite", "int8", tflite_int8),
    Format("onnx_float", "onnx", "float", "model.onnx", "float", onnx_float),
    Format("onnx_int8", "onnx", "int8", "model_int8.onnx", "int8", onnx_int8),
)


def select_formats(tflite: list[str] | None, onnx: list[str] | None) -> list[Format]:
    """Rows for `--tflite ... --onnx ...`; neither given means every format."""
    wanted = {"tflite": tflite or [], "onnx": onnx or []}
    if not tflite and not onnx:
        wanted = {"tflite": ["all"], "onnx": ["all"]}
    chosen = []
    for family, flags in wanted.items():
        known = {f.flag for f in FORMATS if f.family == family}
        unknown = sorted(set(flags) - known - {"all"})
        if unknown:
            raise UserError(f"--{family} {', '.join(unknown)}: choose from {', '.join(sorted(known))} or all")
        chosen += [f for f in FORMATS if f.family == family and ("all" in flags or f.flag in flags)]
    return chosen


def representative_images(cfg: EdgeftConfig, splits) -> np.ndarray:
    """Up to --rep-samples training images, spread over the classes (seeded)."""
    n = min(cfg.export.rep_samples, len(splits.train.y))
    if n < 100:
        print(f"export: only {n} representative images for int8 calibration (100-500 recommended)")
    idx = np.random.default_rng(cfg.train.seed).permutation(len(splits.train.y))[:n]
    return splits.train.x[np.sort(idx)].astype(np.float32)


def export(run: str | Path, tflite: list[str] | None = None, onnx: list[str] | None = None,
           cfg: EdgeftConfig | None = None) -> dict:
    """Writes the chosen formats to RUN/export/ and runs the parity gate on them.

    Returns the parity report; raises ParityError (after writing parity.json / parity.md) when
    any file disagrees with Keras beyond its tier.
    """
    from .data import run_splits
    from .parity import check_parity
    from .qat import load_qat_model, qat_supported

    run = Path(run)
    if not (run / "model.keras").is_file():
        raise UserError(f"{run} is not a finished edgeft run (no model.keras)")
    cfg = cfg or from_yaml_file(run / "config.yaml")
    formats = select_formats(tflite, onnx)
    model = load_model(run / "model.keras")   # first: a broken run fails before any data work
    splits = run_splits(cfg)
    qat_model = None if cfg.export.int8_source == "ptq" else load_qat_model(run)
    if qat_model is None and cfg.export.int8_source == "qat":
        raise UserError(f"--int8-source qat: {run} has no QAT model; run `edgeft qat {run}` first")
    ok, note = qat_supported(cfg)
    if qat_model is None:
        print("export: int8 by post-training quantization" + ("" if ok else f" ({note})"))
    ctx = ExportContext(run, cfg, model, qat_model,
                        representative_images(cfg, splits), splits.classes)
    out = run / EXPORT_DIR
    out.mkdir(exist_ok=True)
    rundir.write_text(out / "labels.txt", "\n".join(splits.classes) + "\n")
    made_from = rundir.read_json(out / "formats.json", {})
    for fmt in formats:
        if fmt.tier == "int8":
            made_from[fmt.name] = "qat" if fmt.name == "tflite_int8" and qat_model is not None else "ptq"
        try:
            data = fmt.build(ctx)
        except UserError:
            raise
        except Exception as e:  # converter failures name the format and keep the message short
            raise UserError(f"{fmt.name} export failed: {(str(e).strip().splitlines() or [type(e).__name__])[-1][:300]}") from None
        rundir.write_bytes(out / fmt.filename, data)
        rundir.write_json(out / "formats.json", made_from)   # parity reads how each int8 file was made
        print(f"export: wrote {out / fmt.filename} ({len(data) / 1e6:.2f} MB), checking parity...")
    return check_parity(run, cfg=cfg, formats=formats, splits=splits, model=ctx.model, qat_model=qat_model)
