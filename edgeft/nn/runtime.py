"""Running a model file the way a device does: LiteRT, ONNX Runtime, or Keras.

One small protocol, `Runner.predict(batch) -> probs`, with batch = float32 NHWC RGB pixels 0-255
(the input contract of every edgeft model). The TFLite and ONNX runners, (de)quantization and
label reading live in `edgeft.device`, the single file users copy to a device
(tools/edgeft_device.py), so the parity gate, evaluation and the device run the same code; this
module adds the Keras runner and turns the device script's errors into UserError. It imports no
TensorFlow (Keras is imported lazily, only for .keras files).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edgeft import device
from edgeft.core.errors import UserError
from edgeft.core.logs import captured
from edgeft.device import LABELS_FILE, OnnxRunner, dequantize, quantize

# the device script's runners and (de)quantization are the package's too: one implementation
__all__ = ["Runner", "TFLiteRunner", "OnnxRunner", "KerasRunner", "RUNNERS", "open_runner", "read_labels",
           "embedded_tflite_labels", "quantize", "dequantize", "LABELS_FILE"]


class Runner(Protocol):
    path: Path
    input_hw: tuple[int, int]

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


class TFLiteRunner(device.TFLiteRunner):
    """The device script's LiteRT runner; the line LiteRT prints once a process when it first
    applies XNNPACK ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.") goes to edgeft's log."""

    def __init__(self, path, threads: int | None = None):
        with captured("litert", fd2=True):
            super().__init__(path, threads)


class KerasRunner:
    """A .keras file (float or QAT) under Keras; the reference the exports are compared with."""

    def __init__(self, path: str | Path, threads: int | None = None, model=None):
        from edgeft.nn.model import load_model

        self.path = Path(path)
        self.model = model if model is not None else load_model(self.path)
        self.input_hw = tuple(int(v) for v in self.model.input_shape[1:3])
        self.num_classes = int(self.model.output_shape[-1])

    # the device runners' three steps, which `device.time_runner` times apart
    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(pixels, np.float32)[None]

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        return self.model.predict_on_batch(batch)

    def probabilities(self, raw) -> np.ndarray:
        return np.asarray(raw, np.float32).reshape(-1)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        # predict_on_batch reuses one compiled function; Model.predict sets up a loop per call,
        # which would swamp batch-1 latency
        batch = np.asarray(batch, np.float32)
        return np.concatenate([np.asarray(self.model.predict_on_batch(batch[i:i + 64]), np.float32)
                               for i in range(0, len(batch), 64)])


RUNNERS = {**device.RUNNERS, ".tflite": TFLiteRunner, ".keras": KerasRunner}


def open_runner(path: str | Path, threads: int | None = None) -> Runner:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}")
    if p.suffix.lower() not in RUNNERS:
        raise UserError(f"{p}: unsupported model type {p.suffix!r} (use .tflite, .onnx or .keras)")
    if p.suffix.lower() != ".keras":
        try:
            with captured("litert", fd2=True):
                return device.open_runner(p, threads)
        except device.DeviceError as e:
            raise UserError(str(e)) from None
    try:
        return KerasRunner(p, threads)
    except UserError:
        raise
    except Exception as e:  # a corrupt or foreign file: say which, in one line
        raise UserError(f"cannot load {p}: {device.clip((str(e).splitlines() or [type(e).__name__])[0])}") from None


def embedded_tflite_labels(model_path: str | Path) -> list[str] | None:
    """labels.txt from the zip archive appended to edgeft's .tflite files, or None."""
    return device.embedded_tflite_labels(model_path)


def _label_files(model_path: str | Path) -> tuple[Path, Path]:
    p = Path(model_path)
    return p.parent / LABELS_FILE, p.parent.parent / LABELS_FILE


def label_places(model_path: str | Path) -> list[str]:
    """Where `read_labels` looks, in order (for the warning that it found none)."""
    return device.label_places(model_path, _label_files(model_path))


def read_labels(model_path: str | Path) -> list[str] | None:
    """Class names: labels.txt beside the model, else in its parent folder (a run's labels.txt for
    RUN/export/FILE), else the labels in the file itself (the archive appended to a .tflite file,
    or the ONNX metadata `labels`)."""
    p = Path(model_path)
    for candidate in _label_files(p):
        if candidate.is_file():
            return device.label_lines(candidate.read_text(encoding="utf-8-sig"))
    try:
        return device.model_labels(p)[0]
    except device.DeviceError as e:
        raise UserError(str(e)) from None
