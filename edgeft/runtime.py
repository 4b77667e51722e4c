"""Running a model file the way a device does: LiteRT, ONNX Runtime, or Keras.

One small protocol, `Runner.predict(batch) -> probs`, with batch = float32 NHWC RGB pixels 0-255
(the input contract of every edgeft model). Int8 (de)quantization happens here and nowhere else.
This module imports no TensorFlow (Keras is imported lazily, only for .keras files), so parity,
evaluation and benchmarks use the exact runtime a device uses.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import UserError

LABELS_MEMBER = "labels.txt"   # inside the zip archive appended to edgeft's .tflite files


class Runner(Protocol):
    path: Path
    input_hw: tuple[int, int]

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


def quantize(x: np.ndarray, dtype, scale: float, zero_point: int) -> np.ndarray:
    """float -> integer tensor with the file's (scale, zero point); float inputs pass through."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or not scale:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if q.dtype.kind not in "iu" or not scale:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


class TFLiteRunner:
    """A .tflite file under LiteRT (the interpreter without TensorFlow)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.input_hw = tuple(int(v) for v in self.input["shape"][1:3])

    def predict_one(self, image: np.ndarray) -> np.ndarray:
        scale, zp = self.input["quantization"]
        self.interpreter.set_tensor(self.input["index"], quantize(image[None], self.input["dtype"], scale, zp))
        self.interpreter.invoke()
        scale, zp = self.output["quantization"]
        return dequantize(self.interpreter.get_tensor(self.output["index"]), scale, zp)[0]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        # batch 1 is what devices run and what every converter supports; loop over the batch
        return np.stack([self.predict_one(img) for img in np.asarray(batch, np.float32)])


class OnnxRunner:
    """A .onnx file under ONNX Runtime (CPU)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.input_hw = tuple(int(v) for v in self.input.shape[1:3])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input.name: np.asarray(batch, np.float32)})[0].astype(np.float32)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)


class KerasRunner:
    """A .keras file (float or QAT) under Keras; the reference the exports are compared with."""

    def __init__(self, path: str | Path, threads: int | None = None, model=None):
        from .model import load_model

        self.path = Path(path)
        self.model = model if model is not None else load_model(self.path)
        self.input_hw = tuple(int(v) for v in self.model.input_shape[1:3])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        # predict_on_batch reuses one compiled function; Model.predict sets up a loop per call,
        # which would swamp batch-1 latency
        batch = np.asarray(batch, np.float32)
        return np.concatenate([np.asarray(self.model.predict_on_batch(batch[i:i + 64]), np.float32)
                               for i in range(0, len(batch), 64)])


RUNNERS = {".tflite": TFLiteRunner, ".onnx": OnnxRunner, ".keras": KerasRunner}


def open_runner(path: str | Path, threads: int | None = None) -> Runner:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}")
    cls = RUNNERS.get(p.suffix.lower())
    if cls is None:
        raise UserError(f"{p}: unsupported model type {p.suffix!r} (use .tflite, .onnx or .keras)")
    try:
        return cls(p, threads)
    except UserError:
        raise
    except Exception as e:  # a corrupt or foreign file: say which, in one line
        raise UserError(f"cannot load {p}: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None


def _label_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def embedded_tflite_labels(model_path: str | Path) -> list[str] | None:
    """labels.txt from the zip archive edgeft appends to its .tflite files, or None."""
    try:
        with zipfile.ZipFile(model_path) as zf:
            text = zf.read(LABELS_MEMBER).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError):
        return None
    return _label_lines(text)


def read_labels(model_path: str | Path) -> list[str] | None:
    """Class names: labels.txt beside the model (or its run dir), else the labels in the file
    itself (ONNX metadata, or the archive appended to a .tflite file)."""
    p = Path(model_path)
    for candidate in (p.parent / "labels.txt", p.parent.parent / "labels.txt"):
        if candidate.is_file():
            return _label_lines(candidate.read_text())
    if p.suffix.lower() == ".tflite":
        return embedded_tflite_labels(p)
    if p.suffix.lower() == ".onnx":
        import onnx

        meta = {m.key: m.value for m in onnx.load(str(p), load_external_data=False).metadata_props}
        if "labels" in meta:
            return list(json.loads(meta["labels"]))
    return None
