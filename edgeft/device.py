#!/usr/bin/env python3
"""edgeft on the device: benchmark, predict with and verify an exported model, without TensorFlow.

One self-contained file: copy it to the device (e.g. a Raspberry Pi) next to the model. It needs
numpy, pillow and one runtime: ai-edge-litert for .tflite files (else tflite-runtime; never
TensorFlow) and onnxruntime for .onnx files. The edgeft
package imports this same file (`edgeft.device`), so image decoding, (de)quantization, label
reading and the latency-outlier rule exist once: training, the parity gate and the device all
use these functions. (In the repository, tools/edgeft_device.py is a symlink to this file;
`cp -L tools/edgeft_device.py .` gives a standalone copy.)

    pip install ai-edge-litert numpy pillow          # or: pip install onnxruntime numpy pillow
    python edgeft_device.py bench model_int8.tflite --data folder/ --threads 1,2,4 --json out.json
    python edgeft_device.py bench model.onnx --random --runs 50 --warmup-runs 5
    python edgeft_device.py bench files/ --random --json bench.json   # every file in files/, a process each
    python edgeft_device.py predict model_int8.tflite photo.jpg more_photos/ --top-k 3
    python edgeft_device.py verify model_int8.tflite golden/

Model contract (fixed by edgeft): one NHWC input taking RGB pixels 0-255 at the model's image
size, one output of class probabilities (1, num_classes). Integer (int8/uint8/int16) TFLite inputs
are quantized with the scale and zero point stored in the file, integer outputs are dequantized.
int16 tensors are symmetric (TFLite's 16x8 rule: zero point 0, range -32767..32767, never -32768).
edgeft's 16x8 file (model_int16x8.tflite: int16 activations, int8 weights) has float32 input and
output, raw pixels 0-255 in as the float file; an int16-input 16x8 file from elsewhere is quantized
by that rule.
Images are decoded with Pillow: the EXIF orientation applied first (as PIL.ImageOps.exif_transpose
does: a phone photo taken upright is upright), then any mode to RGB (16/32-bit greyscale scaled
down by their bit depth, palette transparency through RGBA, alpha dropped), bilinear resize.
Decoder version 3 (`DECODER_VERSION`); version 1 ignored the EXIF orientation and version 2 scaled
16-bit images by their own maximum, so golden vectors written by them decode differently here for
such images, and verify says so.

Labels: labels.txt beside the model (one per line; blank lines ignored), else the labels.txt in
the zip archive appended to a .tflite file (TFLite Model Metadata packs its label files that way),
else the ONNX metadata key "labels" (a JSON list).

bench: two latencies per run, batch 1, from one clock (`time_runner`; `edgeft benchmark` uses
the same function): `invoke_ms`, one set_tensor + invoke + get_tensor (TFLite) or one session.run
(ONNX) on an input already in the model's dtype, and `end_to_end_ms`, float pixels in to
probabilities out: quantize + invoke + dequantize (image decoding is never timed). Slow outliers
(scheduler hiccups) are dropped before the statistics: samples above median + 5 * 1.4826 * MAD
(about five standard deviations) are removed and counted in `outliers_removed`. (Reports written
before this rule have `latency_ms`, the invoke time: `invoke_latency` reads both.)

verify: replays the golden vectors `edgeft export` writes to export/golden/:

    golden/expected.json     {"format": "edgeft-golden", "version": 1, "decoder_version": 2, "image_size": [H, W],
                              "labels": [...],
                              "inputs": [{"file": "inputs/000.png", "label": ..., "source": ...,
                                          "pixels_sha256": sha256 of the decoded uint8 HxWx3 pixels}],
                              "files": {"model_int8.tflite": {"tier": "int8", "max_abs_diff": 0.15,
                                        "top1_must_match": true, "sha256": ..., "runtime": ...,
                                        "outputs": [[p0, p1, ...], ...]}, ...}}
    golden/inputs/000.png    the validation image files, byte for byte as they were in the data set

Each input is decoded here at the model's size and its pixels' sha256 compared with the one at
export time (so the device's decoding and resizing are checked too); the model's probabilities
must be within `max_abs_diff` of the outputs the same file gave at export time, and, where
`top1_must_match`, have the same top-1 class.

Exit status: 0 success (verify: within the tier), 1 verify failed, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

if __name__ == "__main__" and sys.path and os.path.isfile(os.path.join(sys.path[0] or ".", "__init__.py")):
    # run through the tools/edgeft_device.py symlink: Python puts the edgeft package folder on the
    # path, whose module names must not shadow anything
    del sys.path[0]

import math

import numpy as np
from PIL import Image, ImageOps

# The contract: what the edgeft package imports from this file (tests/test_layout.py and
# tests/test_leftovers.py check that it imports nothing else), so decoding, labels, (de)quantization, prediction, timing and the
# manifest rule exist once. Everything else here is the command line's own.
__all__ = [
    # decode
    "IMAGE_EXTS", "IMAGE_ERRORS", "DECODER_VERSION", "to_rgb", "load_image", "decode_image", "pixels_sha256",
    "image_files",
    # quantize
    "quantize", "dequantize",
    # labels
    "LABELS_FILE", "label_lines", "embedded_tflite_labels", "model_labels", "label_places", "labels_warning",
    # runners
    "DeviceError", "TFLiteRunner", "OnnxRunner", "RUNNERS", "open_runner",
    # predict
    "top_classes", "predict_images", "print_predictions",
    # timing
    "LATENCY_POOL", "LATENCY_RULE", "TIMED", "time_runner", "invoke_latency", "without_outliers", "latency_stats",
    "child_json",
    # manifest, golden vectors
    "MANIFEST", "file_sha256", "check_manifest", "manifest_files", "entry_problem",
    "GOLDEN_FORMAT", "GOLDEN_VERSION", "GOLDEN_FILE", "GOLDEN_INPUTS",
    # shared helpers: one-line messages, strict JSON, the command line's argparse types
    "clip", "first_line", "json_safe", "int_at_least", "thread_count", "TIMED_RUNS", "WARMUP_RUNS",
    # the script's own entry point (tools/edgeft_device.py)
    "main",
]

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
LABELS_FILE = "labels.txt"
ONNX_LABELS_KEY = "labels"
GOLDEN_FORMAT, GOLDEN_VERSION = "edgeft-golden", 1
GOLDEN_FILE, GOLDEN_INPUTS = "expected.json", "inputs"
# bench cycles through this many prepared inputs, so memory stays flat however large the folder
LATENCY_POOL = 16
OUTLIER_MADS = 5.0
MAD_TO_STD = 1.4826   # scales the MAD to a standard deviation for normally distributed samples
LATENCY_RULE = f"samples above median + {OUTLIER_MADS:g} * {MAD_TO_STD} * MAD removed"
# 2: the EXIF orientation is applied (1: it was ignored). Part of the image cache's key, and
# written into golden vectors, so pixels from another decoder version are never mixed up.
DECODER_VERSION = 3   # 3: 16-bit images scaled by their bit depth (sBIT honoured), never by their own maximum
EXIF_ORIENTATION = 0x0112
# --threads above this many per CPU of the machine the runtime runs on are refused: LiteRT
# crashed (exit 139) and ONNX Runtime grew to 20,792 threads at --threads 100000
THREADS_PER_CPU = 4


class DeviceError(Exception):
    """Bad input (missing file, corrupt model, unusable folder): one line, exit status 2."""


def first_line(error: BaseException, limit: int = 400) -> str:
    lines = str(error).strip().splitlines()
    return clip((lines[0] if lines else type(error).__name__), limit)


def clip(text: str, limit: int = 400) -> str:
    """`text` cut to at most `limit` characters at a word boundary, "..." marking the cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 4].rsplit(" ", 1)[0] if " " in text[:limit - 4] else text[:limit - 4]
    return cut.rstrip(" ,;:") + " ..."


def json_safe(obj):
    """`obj` with every non-finite float (NaN, inf) as None: strict JSON (`allow_nan=False`), which
    every JSON reader takes; a metric that cannot be computed is null, never NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def max_threads() -> int:
    """The most runtime threads this machine accepts: THREADS_PER_CPU per CPU."""
    return THREADS_PER_CPU * (os.cpu_count() or 1)


def check_threads(threads) -> None:
    if threads is not None and not 1 <= int(threads) <= max_threads():
        raise DeviceError(f"--threads must be from 1 to {max_threads()} ({THREADS_PER_CPU} per CPU of this "
                          f"machine, which has {os.cpu_count() or 1}), got {threads}")


# ================================================================================================
# 1. decode: image files -> uint8 RGB pixels at the model's size (the one decoder)
# ================================================================================================

def to_rgb(img: Image.Image, significant_bits: int | None = None) -> Image.Image:
    """RGB from any PIL mode. 16-bit greyscale ("I;16*", and "I", which Pillow uses for 16-bit
    PNGs and 32-bit integer TIFFs) is scaled by its bit depth, 0-65535 -> 0-255, the same for every
    image of a format: never by the image's own maximum (version 2 did that, so two 16-bit PNGs
    differing in one pixel decoded to mean 124 and 0.47). `significant_bits` (a PNG's sBIT chunk,
    e.g. 12) says how many of the 16 bits carry data: samples are shifted right to those bits first,
    as the PNG specification describes. Float images ("F") are taken as 0-1."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)
        bits = significant_bits if significant_bits and 1 <= significant_bits < 16 else 16
        arr = np.clip(arr, 0, 65535) >> (16 - bits)
        img = Image.fromarray(np.clip(arr / float(2 ** bits - 1) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path, size) -> np.ndarray:
    """Decoded image as uint8 HxWx3 RGB at `size` (square int, or (height, width)).

    Raises OSError/ValueError (and PIL's DecompressionBombError) for files that are empty,
    truncated or not images.
    """
    return decode_image(path, size)[0]


IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)   # what a bad image file raises in load_image


def decode_image(path, size) -> tuple[np.ndarray, str]:
    """`load_image`'s pixels and the file's own PIL mode ("P", "L", "RGBA"...), from one decode
    (the image cache records the mode of every image it converts)."""
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    with Image.open(path) as img:
        img.load()  # decode fully now: a truncated file fails here, not later
        sbit = png_significant_bits(path) if img.format == "PNG" and img.mode.startswith("I") else None
        if orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img, sbit)
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8), img.mode


def png_significant_bits(source) -> int | None:
    """The grey sample's significant bits from a PNG's sBIT chunk (before IDAT), or None. `source`:
    a path or a seekable binary file (read from its start, position restored)."""
    import struct

    f = open(source, "rb") if isinstance(source, (str, os.PathLike)) else source
    try:
        pos = f.tell()
        f.seek(0)
        data = f.read(1 << 16)
        f.seek(pos)
    finally:
        if f is not source:
            f.close()
    i = 8   # after the signature
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind == b"sBIT" and length >= 1 and i + 9 <= len(data):
            return int(data[i + 8])
        if kind == b"IDAT":
            return None
        i += 12 + length
    return None


def orientation(img: Image.Image) -> int:
    """The image's EXIF orientation (1: as stored; 2-8: mirrored and/or rotated); 1 for no or
    unreadable EXIF data (a damaged EXIF block does not make the image unreadable)."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # PIL raises many types for damaged EXIF blocks
        return 1
    return value if 1 <= value <= 8 else 1


def file_orientation(path) -> int:
    try:
        with Image.open(path) as img:
            return orientation(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return 1


def pixels_sha256(pixels: np.ndarray) -> str:
    """sha256 of decoded uint8 pixels (row-major HxWx3): what verify compares decodes by."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def image_files(items) -> list[str]:
    """Image files named directly, plus the image files under any folder named (sorted)."""
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise DeviceError(f"no images (jpg/jpeg/png/bmp/gif) in folder {p}")
            paths += found
        elif p.is_file():
            paths.append(str(p))
        else:
            raise DeviceError(f"image {p} {not_a_file(p)}")
    return paths


def not_a_file(p: Path) -> str:
    """What is at `p`, which is neither a regular file nor a folder: a FIFO is not "not found"."""
    import stat

    try:
        mode = p.stat().st_mode
    except OSError:
        return "is a broken symbolic link" if p.is_symlink() else "not found"
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    what = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"is {what}, not an image file: give an image file or a folder of them"


# ================================================================================================
# 2. quantize: float pixels <-> the int8 / uint8 tensors of a quantized model
# ================================================================================================

def quantize(x: np.ndarray, dtype, scale: float, zero_point: int) -> np.ndarray:
    """float -> integer tensor with the file's (scale, zero point); float inputs pass through. int16
    is symmetric in TFLite (16x8: zero point 0, -32767..32767): its lowest value is never used."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or not scale:
        return np.asarray(x).astype(dtype)
    info = np.iinfo(dtype)
    low = -info.max if dtype == np.int16 else info.min
    return np.clip(np.round(np.asarray(x) / scale + zero_point), low, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if q.dtype.kind not in "iu" or not scale:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


# ================================================================================================
# 3. labels: labels.txt beside the model, the TFLite file's archive, the ONNX metadata
# ================================================================================================

def label_lines(text: str) -> list[str]:
    """One label per line, surrounding spaces stripped; blank lines (a trailing newline, a
    Windows \\r) are not classes."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def labels_beside(model_path) -> list[str] | None:
    path = Path(model_path).with_name(LABELS_FILE)
    return label_lines(path.read_text(encoding="utf-8-sig")) if path.is_file() else None


def embedded_tflite_labels(model_path) -> list[str] | None:
    """labels.txt from the zip archive appended to a .tflite file, or None."""
    try:
        with zipfile.ZipFile(model_path) as zf:
            text = zf.read(LABELS_FILE).decode("utf-8-sig")
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError, ValueError):
        return None
    return label_lines(text)


def onnx_metadata_labels(metadata: dict, model_path="model") -> list[str] | None:
    """The JSON list under metadata key "labels", or None when the key is absent."""
    text = metadata.get(ONNX_LABELS_KEY)
    if text is None:
        return None
    try:
        labels = json.loads(text)
    except ValueError:
        labels = None
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise DeviceError(f"{model_path}: metadata \"labels\" is not a JSON list of strings")
    return labels


def model_labels(model_path, runner=None) -> tuple[list[str] | None, str | None]:
    """(labels, source) from the model side, or (None, None). labels.txt beside the model wins
    over the labels inside it. `runner` (an OnnxRunner) saves opening the file a second time."""
    labels = labels_beside(model_path)
    if labels is not None:
        return labels, LABELS_FILE
    suffix = Path(model_path).suffix.lower()
    if suffix == ".tflite":
        labels = embedded_tflite_labels(model_path)
        return (labels, f"embedded {LABELS_FILE}") if labels is not None else (None, None)
    if suffix == ".onnx":
        meta = runner.metadata() if runner is not None else onnx_metadata(model_path)
        labels = onnx_metadata_labels(meta, model_path)
        return (labels, "metadata") if labels is not None else (None, None)
    return None, None


def label_places(model_path, files=None) -> list[str]:
    """Where labels are looked for, in order, for a warning that none were found: `files` (default:
    labels.txt beside the model), then the place inside the model file its format keeps them."""
    model_path = Path(model_path)
    places = [str(f) for f in (files if files is not None else [model_path.with_name(LABELS_FILE)])]
    suffix = model_path.suffix.lower()
    if suffix == ".tflite":
        places.append(f"the {LABELS_FILE} inside the .tflite file")
    elif suffix == ".onnx":
        places.append(f'the ONNX metadata "{ONNX_LABELS_KEY}"')
    return places


def labels_warning(labels, num_classes: int, model_path, source=None, places=None) -> str | None:
    """A warning when no labels were found (class ids are shown; `places`, default `label_places`,
    says where they were looked for), or when the labels do not name every output (a labels file
    cut off or padded): the outputs without a label are shown by their class id."""
    if labels is None:
        where = ", ".join(places if places is not None else label_places(model_path))
        return f"{model_path}: no labels found, so class ids are shown (labels are read from: {where})"
    if len(labels) == num_classes:
        return None
    where = f" ({source})" if source else ""
    if len(labels) < num_classes:
        return (f"{model_path}: {len(labels)} labels{where} for {num_classes} outputs (cut off?): classes "
                f"{len(labels)} to {num_classes - 1} are shown by their class id")
    return (f"{model_path}: {len(labels)} labels{where} for {num_classes} outputs: the last "
            f"{len(labels) - num_classes} are unused")


def onnx_metadata(model_path) -> dict[str, str]:
    """Custom metadata of an .onnx file, read by ONNX Runtime (no onnx package needed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DeviceError(".onnx files need onnxruntime: pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's load errors share no base class below Exception
        raise DeviceError(f"cannot load {model_path}: {first_line(e)}") from None
    return dict(session.get_modelmeta().custom_metadata_map)


# ================================================================================================
# 4. runners: LiteRT (TFLite) and ONNX Runtime behind one predict(batch) -> probabilities
# ================================================================================================

def tflite_interpreter():
    """(Interpreter class, runtime name, version): LiteRT, else tflite-runtime."""
    try:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert", getattr(ai_edge_litert, "__version__", "unknown")
    except ImportError:
        pass
    try:
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime", getattr(tflite_runtime, "__version__", "unknown")
    except ImportError:
        pass
    # never TensorFlow: this file runs on devices that have only a runtime and numpy
    raise DeviceError(".tflite files need LiteRT: pip install ai-edge-litert")


def _quantization(detail) -> dict | None:
    """{"scale", "zero_point"} for an integer TFLite tensor, else None."""
    if np.dtype(detail["dtype"]).kind not in "iu":
        return None
    scale, zero_point = detail["quantization"]
    return {"scale": float(scale), "zero_point": int(zero_point)}


def _check_image_input(path, shape) -> None:
    if len(shape) != 4 or shape[3] != 3 or any(d is None or d <= 0 for d in shape[1:3]):
        raise DeviceError(f"{path}: expected an NHWC RGB input with fixed height and width, "
                          f"got shape {list(shape)}")


class TFLiteRunner:
    """A .tflite file under LiteRT, batch 1 (what devices run and every converter supports)."""
    format = "tflite"

    def __init__(self, path, threads: int | None = None):
        interpreter_class, self.runtime, self.runtime_version = tflite_interpreter()
        self.path = Path(path)
        start = time.perf_counter()
        try:
            self.interpreter = interpreter_class(model_path=str(self.path), num_threads=threads)
            detail = self.interpreter.get_input_details()[0]
            if detail["shape"][0] != 1:   # dynamic batch: run one image at a time
                self.interpreter.resize_tensor_input(detail["index"], [1, *detail["shape"][1:]])
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise DeviceError(f"cannot load {self.path}: {first_line(e)}") from None
        self.load_ms = (time.perf_counter() - start) * 1000.0
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        _check_image_input(self.path, [int(d) for d in self.input["shape"]])
        for detail in (self.input, self.output):
            q = _quantization(detail)
            if q is not None and q["scale"] == 0.0:
                raise DeviceError(f"{self.path}: integer tensor {detail['name']} has no quantization scale")
        self.input_hw = (int(self.input["shape"][1]), int(self.input["shape"][2]))
        self.num_classes = int(self.output["shape"][-1])

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """One HxWx3 image (pixels 0-255) as a batch of one in the input dtype."""
        scale, zero_point = self.input["quantization"]
        return quantize(np.asarray(pixels, np.float32)[None], self.input["dtype"], scale, zero_point)

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        """The timed call: copy in, invoke, copy out."""
        self.interpreter.set_tensor(self.input["index"], batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        scale, zero_point = self.output["quantization"]
        return dequantize(np.asarray(raw), scale, zero_point).reshape(-1)

    def predict_one(self, image: np.ndarray) -> np.ndarray:
        return self.probabilities(self.invoke(self.prepare(image)))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 NHWC pixels 0-255 -> (N, num_classes) probabilities."""
        return np.stack([self.predict_one(img) for img in np.asarray(batch, np.float32)])

    def tensor_info(self) -> tuple[dict, dict]:
        return tuple({"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                      "quantization": _quantization(d)} for d in (self.input, self.output))


ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


def _dim(value):
    """A fixed dimension as int; dynamic ones (None, 'batch', 'unk__3') as None."""
    return value if isinstance(value, int) and value > 0 else None


class OnnxRunner:
    """A .onnx file under ONNX Runtime (CPU); intra-op threads as asked, inter-op 1."""
    format = "onnx"
    runtime = "onnxruntime"
    chunk = 64    # images per session.run when the batch axis is dynamic

    def __init__(self, path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DeviceError(".onnx files need onnxruntime: pip install onnxruntime") from None
        self.path = Path(path)
        self.runtime_version = ort.__version__
        opts = ort.SessionOptions()
        opts.log_severity_level = 3   # errors only
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's load errors share no base class below Exception
            raise DeviceError(f"cannot load {self.path}: {first_line(e)}") from None
        self.load_ms = (time.perf_counter() - start) * 1000.0
        self.input = self.session.get_inputs()[0]
        self.output = self.session.get_outputs()[0]
        shape = [_dim(d) for d in self.input.shape]
        _check_image_input(self.path, shape)
        if self.input.type not in ONNX_DTYPES:
            raise DeviceError(f"{self.path}: unsupported input type {self.input.type}")
        self.dtype = np.dtype(ONNX_DTYPES[self.input.type])
        self.batch = shape[0]   # None: any batch size
        self.input_hw = (shape[1], shape[2])
        classes = _dim(self.output.shape[-1]) if self.output.shape else None
        if classes is None:
            raise DeviceError(f"{self.path}: expected an output of shape (1, num_classes), got {self.output.shape}")
        self.num_classes = classes

    def _cast(self, x: np.ndarray) -> np.ndarray:
        return quantize(x, self.dtype, 1.0, 0) if self.dtype.kind in "iu" else np.asarray(x).astype(self.dtype)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        return self._cast(np.asarray(pixels, np.float32)[None])

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        """The timed call."""
        return self.session.run([self.output.name], {self.input.name: batch})[0]

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        return np.asarray(raw).reshape(-1).astype(np.float32)

    def predict_one(self, image: np.ndarray) -> np.ndarray:
        return self.probabilities(self.invoke(self.prepare(image)))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 NHWC pixels 0-255 -> (N, num_classes) probabilities."""
        x = self._cast(np.asarray(batch, np.float32))
        step = self.chunk if self.batch is None else self.batch
        out = [np.asarray(self.invoke(x[i:i + step]), np.float32).reshape(-1, self.num_classes)
               for i in range(0, len(x), step)]
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def tensor_info(self) -> tuple[dict, dict]:
        return ({"name": self.input.name, "shape": [1, *self.input_hw, 3], "dtype": self.dtype.name,
                 "quantization": None},
                {"name": self.output.name, "shape": [1, self.num_classes],
                 "dtype": np.dtype(ONNX_DTYPES.get(self.output.type, np.float32)).name, "quantization": None})


RUNNERS = {".tflite": TFLiteRunner, ".onnx": OnnxRunner}


def open_runner(path, threads: int | None = None):
    """The runner for a model file, chosen by its suffix."""
    p = Path(path)
    if not p.is_file():
        raise DeviceError(f"model file not found: {p}")
    cls = RUNNERS.get(p.suffix.lower())
    if cls is None:
        raise DeviceError(f"{p}: unsupported model type {p.suffix!r} (use .tflite or .onnx)")
    check_threads(threads)
    try:
        return cls(p, threads)
    except DeviceError:
        raise
    except Exception as e:  # a corrupt or foreign file: say which, in one line
        raise DeviceError(f"cannot load {p}: {first_line(e)}") from None


# ================================================================================================
# 5. the timing rule: what one latency sample is, and the slow outliers left out
# ================================================================================================

def without_outliers(samples) -> np.ndarray:
    """Samples with the slow outliers (above median + 5 * 1.4826 * MAD) removed."""
    samples = np.asarray(samples, dtype=np.float64)
    median = np.median(samples)
    mad = np.median(np.abs(samples - median))
    if mad == 0.0:   # e.g. a coarse clock: every sample off the median would go
        return samples
    return samples[samples <= median + OUTLIER_MADS * MAD_TO_STD * mad]


TIMED = ("invoke_ms", "end_to_end_ms")   # what `time_runner` reports, by these names everywhere


def time_runner(runner, pool, runs: int, warmup: int) -> dict:
    """Batch-1 timing of `runner` (prepare / invoke / probabilities) cycling through `pool` (HxWx3
    float32 pixels 0-255). Per run, one clock gives both latencies: `invoke_ms`, the runtime call
    alone (TFLite: set_tensor + invoke + get_tensor; ONNX: session.run), and `end_to_end_ms`,
    pixels to probabilities (quantize + invoke + dequantize). Returns {name: statistics (ms)} for
    both, and "outliers_removed": {name: count}; the device's bench and `edgeft benchmark` both
    report these, so a number means the same wherever it was measured."""
    for i in range(warmup):
        runner.probabilities(runner.invoke(runner.prepare(pool[i % len(pool)])))
    clock = time.perf_counter_ns
    samples = np.empty((2, runs), dtype=np.float64)
    for i in range(runs):
        pixels = pool[i % len(pool)]
        t0 = clock()
        batch = runner.prepare(pixels)
        t1 = clock()
        raw = runner.invoke(batch)
        t2 = clock()
        runner.probabilities(raw)
        t3 = clock()
        samples[0, i], samples[1, i] = (t2 - t1) / 1e6, (t3 - t0) / 1e6
    out, removed = {}, {}
    for name, row in zip(TIMED, samples):
        out[name], removed[name] = latency_stats(row)
    return out | {"outliers_removed": removed}


def invoke_latency(result: dict):
    """The invoke statistics of one `results` entry of a bench report: `invoke_ms`, or `latency_ms`
    in reports written by device scripts before the two latencies were named (the same timing)."""
    return result.get("invoke_ms", result.get("latency_ms")) if isinstance(result, dict) else None


def latency_stats(samples) -> tuple[dict, int]:
    """(mean/p50/p90/p95/p99/min/max/std of the kept samples, number of outliers removed)."""
    samples = np.asarray(samples, dtype=np.float64)
    kept = without_outliers(samples)
    p50, p90, p95, p99 = np.percentile(kept, [50, 90, 95, 99])
    stats = {"mean": kept.mean(), "p50": p50, "p90": p90, "p95": p95, "p99": p99,
             "min": kept.min(), "max": kept.max(), "std": kept.std()}
    return {k: float(v) for k, v in stats.items()}, int(len(samples) - len(kept))


# ================================================================================================
# 6. manifest: is this the file the export's gate passed (its sha256 in manifest.json)
# ================================================================================================

def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


MANIFEST = "manifest.json"   # written by `edgeft export` beside the files that passed its gate


def check_manifest(model) -> str | None:
    """None when there is no manifest beside the file or the file matches it; a one-line problem
    when its sha256 differs (a changed or corrupted file); a warning (prefixed "warning:") when a
    manifest is there but does not list the file (it did not pass the gate)."""
    model = Path(model)
    man = model.parent / MANIFEST
    if not man.is_file():
        return None
    files = manifest_files(man)
    if files is None:
        return f"{man} is not a valid edgeft manifest"
    entry = files.get(model.name)
    if entry is None:
        return f"warning: {model.name} is not in {man}: it did not pass edgeft's parity gate"
    return entry_problem(model, entry, man)


def manifest_files(man) -> dict | None:
    """The {file name: entry} table of a manifest.json; None when it is no edgeft manifest."""
    try:
        files = json.loads(Path(man).read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError):
        return None
    ok = isinstance(files, dict) and all(isinstance(e, dict) for e in files.values())
    return files if ok else None


def entry_problem(path, entry: dict, man) -> str | None:
    """The one rule both sides check a shipped file by (this script's `predict` / `bench` / `verify`,
    the package's `edgeft parity` and `export --check`): there, and the sha256 the manifest names."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is in the manifest but missing"
    if file_sha256(path) != entry.get("sha256"):
        return f"{path.name} changed after export (its sha256 differs from {man})"
    return None


# ================================================================================================
# 7. command line: one-line errors, the sub-commands' flags
# ================================================================================================

class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as a single line on stderr, exit 2; no abbreviated flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum: int, maximum: int | None = None):
    """argparse type: an integer >= minimum (and <= maximum), with a one-line message otherwise."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text[:40]!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}" if maximum is None else
                                             f"must be from {minimum} to {maximum:,}, got {value:,}")
        return value
    return parse


RUNS_MAX = 100_000   # timed (or warm-up) runs: each latency is kept, and 100,000 runs of 1 ms are 100 s


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


TIMED_RUNS = 100    # bench --runs, and edgeft benchmark's and search's: timed runs per file and thread count
WARMUP_RUNS = 10    # bench --warmup-runs: untimed runs first


class _Renamed(argparse.Action):
    """An old flag name kept for a round: its value goes where the new flag's does, with one line."""

    def __init__(self, option_strings, dest, new="", **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated and will be removed: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def thread_counts(text):
    """argparse type for bench --threads: `1,2,4` (the one list syntax; `1 2 4` still works)."""
    return [thread_count(t) for t in text.split(",") if t.strip()] or [thread_count(text)]


def thread_count(text):
    """argparse type for --threads: 1 to max_threads() (checked where the runtime runs)."""
    value = positive_int(text)
    try:
        check_threads(value)
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--threads ")) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="edgeft_device.py",
                           description="Benchmark, predict with and verify an exported .tflite / .onnx "
                                       "image classifier (no TensorFlow needed).",
                           epilog="Exit status 2 on bad input; verify exits 1 when the file fails its tier.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,predict,verify}", parser_class=OneLineParser)
    sub.required = True

    b = sub.add_parser("bench", help="latency, memory and accuracy of a model file",
                       description="Latency (batch 1), peak memory and, with --data, top-1 accuracy.",
                       epilog="Exit status 2 on bad input. Latency outlier rule: " + LATENCY_RULE + ".")
    b.add_argument("model", help="path to the .tflite or .onnx model file, or a folder of them: each file is "
                                 "then timed in a process of its own (its peak memory less the runtime's "
                                 "empty-process baseline is its ram_mb) and --json holds one report per file, "
                                 "with its sha256 (what `edgeft search --latency-from` reads)")
    source = b.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="FOLDER",
                        help="image folder with one sub-folder per class; reports top-1 accuracy. Class ids "
                             "come from labels.txt beside the model (one label per line), else from the "
                             "labels inside the file (the labels.txt appended to edgeft's .tflite files, the "
                             "ONNX metadata \"labels\"), else from the sorted sub-folder names. "
                             "Images: jpg/jpeg/png/bmp/gif; unreadable ones are skipped")
    source.add_argument("--random", action="store_true",
                        help="time on random pixels (uniform 0-255), no accuracy (the default without --data)")
    b.add_argument("--threads", type=thread_counts, nargs="+", default=[[1]], metavar="N[,N]",
                   help="comma-separated thread counts to benchmark, one result each (default: 1); accuracy "
                        "uses the first")
    b.add_argument("--runs", type=int_at_least(1, RUNS_MAX), default=TIMED_RUNS,
                   help=f"timed runs per thread count, at most {RUNS_MAX:,} (default: {TIMED_RUNS})")
    b.add_argument("--warmup-runs", dest="warmup", type=int_at_least(0, RUNS_MAX), default=WARMUP_RUNS,
                   help=f"untimed runs before timing, per thread count (default: {WARMUP_RUNS})")
    b.add_argument("--warmup", dest="warmup", type=int_at_least(0, RUNS_MAX), action=_Renamed, new="--warmup-runs")
    b.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="use at most N images from --data, taken round-robin across classes (default: all)")
    b.add_argument("--seed", type=non_negative_int, default=0, help="seed for --random inputs (default: 0)")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (written atomically)")
    b.add_argument("--allow-unverified", action="store_true",
                   help="run a model whose sha256 differs from the manifest.json beside it (refused otherwise)")

    r = sub.add_parser("rss-baseline")   # internal (not listed): peak memory of a process with the runtime loaded
    r.add_argument("runtime", choices=sorted(RUNNERS))
    r.add_argument("--json")

    p = sub.add_parser("predict", help="top-k classes for images",
                       description="Top-k classes with their probabilities for each image.")
    p.add_argument("model", help="path to the .tflite or .onnx model file")
    p.add_argument("images", nargs="+", help="image files, or folders (every jpg/jpeg/png/bmp/gif inside)")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes shown per image (default: 3)")
    p.add_argument("--threads", type=thread_count, default=None, help="runtime threads (default: its own choice)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-unverified", action="store_true",
                   help="run a model whose sha256 differs from the manifest.json beside it (refused otherwise)")

    v = sub.add_parser("verify", help="replay the golden vectors edgeft export wrote (export/golden/)",
                       description="Decodes the golden input images here, runs the model on them and compares "
                                   "with the outputs the same file gave at export time, within its tier.",
                       epilog="Exit status 0: within the tier; 1: outside it (or the decoded pixels differ); "
                              "2: bad input.")
    v.add_argument("model", help="path to the .tflite or .onnx model file")
    v.add_argument("golden", help="golden folder (export/golden/: expected.json and inputs/)")
    v.add_argument("--name", help="the file's name in expected.json (default: the model's file name)")
    v.add_argument("--threads", type=thread_count, default=None, help="runtime threads (default: its own choice)")
    v.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH (written atomically)")
    return parser


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        if any(len(group) == 1 for group in args.threads) and len(args.threads) > 1:
            print("warning: space-separated --threads is deprecated and will be removed: use --threads "
                  + ",".join(str(n) for group in args.threads for n in group), file=sys.stderr)
        args.threads = [n for group in args.threads for n in group]
    return args


def _check_json_path(path) -> None:
    """--json PATH must be writable, checked before the work (a benchmark can take minutes)."""
    if path is not None:
        target = Path(path)
        parent = target.resolve().parent
        if target.is_dir():
            raise DeviceError(f"--json {path} is a folder: name a file, e.g. {target / 'result.json'}")
        if not parent.is_dir():
            raise DeviceError(f"folder for --json does not exist: {parent}")
        try:   # permission bits say nothing to root or on a read-only mount: try for real
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise DeviceError(f"--json {path} cannot be written ({os.strerror(e.errno) if e.errno else e}): "
                              f"choose a writable folder") from None


def write_json_atomic(path, obj) -> None:
    """Readers never see a half-written file: a temp file in the same folder, renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(json_safe(obj), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ================================================================================================
# 8. bench: latency and accuracy of a model on a class folder or random inputs
# ================================================================================================

def class_images(data_dir) -> dict[str, list[Path]]:
    """{class folder name: sorted image paths}, in sorted folder order (hidden folders skipped)."""
    folders = sorted(p for p in Path(data_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    images = {f.name: sorted(p for p in f.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
              for f in folders}
    if not any(images.values()):
        raise DeviceError(f"no images found in class sub-folders of {data_dir}")
    return images


def interleaved(lists) -> list:
    """Round-robin merge, so that --limit keeps every class represented."""
    merged = []
    for i in range(max((len(x) for x in lists), default=0)):
        merged.extend(x[i] for x in lists if i < len(x))
    return merged


def dataset(images, labels, source, num_classes, limit):
    """(items, labels, source): items are (path, class_id) pairs."""
    if labels is None:
        labels, source = list(images), "folders"
    if len(labels) != num_classes:
        raise DeviceError(f"{len(labels)} labels ({source}) but the model outputs {num_classes} classes; "
                          "a labels.txt beside the model sets them")
    ids = {name: i for i, name in enumerate(labels)}
    missing = [name for name in images if name not in ids]
    if missing:
        raise DeviceError(f"data folder(s) {', '.join(missing)} not in labels ({source})")
    items = interleaved([[(p, ids[name]) for p in paths] for name, paths in images.items()])
    return items[:limit], labels, source


def accuracy(runner, items, labels):
    """(accuracy dict, latency input pool, unreadable count), streaming the images."""
    pool, unreadable = [], 0
    counts = np.zeros((len(labels), 2), dtype=np.int64)  # [n, correct]
    for path, class_id in items:
        try:
            pixels = load_image(path, runner.input_hw).astype(np.float32)
        except IMAGE_ERRORS:
            unreadable += 1
            continue
        if len(pool) < LATENCY_POOL:
            pool.append(pixels)
        predicted = int(np.argmax(runner.probabilities(runner.invoke(runner.prepare(pixels)))))
        counts[class_id] += (1, predicted == class_id)
    if not pool:
        raise DeviceError("none of the images could be read")
    n, correct = (int(v) for v in counts.sum(axis=0))
    per_class = {label: {"n": int(c[0]), "correct": int(c[1]), "top1": float(c[1] / c[0])}
                 for label, c in zip(labels, counts) if c[0]}   # classes without images are left out
    return {"top1": correct / n, "n": n, "correct": correct, "per_class": per_class}, pool, unreadable


def random_pool(runner, seed) -> list[np.ndarray]:
    """LATENCY_POOL images of uniform random pixels 0-255 (float32 HxWx3) at the model's size."""
    rng = np.random.default_rng(seed)
    h, w = runner.input_hw
    return [rng.uniform(0.0, 255.0, (h, w, 3)).astype(np.float32) for _ in range(LATENCY_POOL)]


def thread_result(runner, threads, pool, runs, warmup) -> dict:
    timed = time_runner(runner, pool, runs, warmup)
    return {"threads": threads, "runs": runs, "warmup": warmup, "load_ms": runner.load_ms, **timed,
            "throughput_ips": 1000.0 / timed["invoke_ms"]["mean"]}


def peak_rss_mb():
    """This process's peak resident memory (MB). On Linux, VmHWM of /proc/self/status: the
    process's own address space since its exec (getrusage's ru_maxrss keeps the high-water mark
    of the process that started it, measured: 334 MB for a 1 MB model timed from a process that
    had trained a network)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024   # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)   # bytes on macOS, KiB on Linux


def machine_info() -> dict:
    return {"machine": platform.machine(), "platform": platform.platform(), "cpu_count": os.cpu_count()}


def folder_models(folder) -> list[Path]:
    """The .tflite / .onnx files directly in `folder`, sorted by name."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in RUNNERS)
    if not files:
        raise DeviceError(f"no .tflite or .onnx files in {folder}")
    return files


def rss_baseline(suffix: str) -> dict:
    """Peak memory of a process that has loaded the runtime for `suffix` files but no model: what
    a file's own peak is measured against (numpy, pillow and the interpreter's code are not the
    model's)."""
    if suffix == ".onnx":
        import onnxruntime  # noqa: F401
    else:
        tflite_interpreter()
    return {"runtime": suffix, "peak_rss_mb": peak_rss_mb()}


def child_json(argv: list[str], what: str) -> dict:
    """Runs this script again with `argv` + --json TMP in a fresh process; its JSON, or
    {"error": its last stderr line}."""
    import subprocess

    fd, tmp = tempfile.mkstemp(prefix=".edgeft-bench-", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--json", tmp],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            return {"error": f"{what}: " + (lines[-1] if lines else f"exit status {proc.returncode}")}
        return json.loads(Path(tmp).read_text(encoding="utf-8"))
    finally:
        os.unlink(tmp)


def bench_folder(args) -> dict:
    """`bench FOLDER`: every model file in its own process (so each peak RSS is that file's), one
    report per file with its sha256 and ram_mb (peak less the runtime's empty-process baseline)."""
    files = folder_models(args.model)
    _check_json_path(args.json)
    if args.data is not None and not Path(args.data).is_dir():
        raise DeviceError(f"data folder not found: {args.data}")
    common = ["--threads", ",".join(map(str, args.threads)), "--runs", str(args.runs), "--warmup-runs", str(args.warmup),
              "--seed", str(args.seed)] + (["--data", args.data] if args.data else ["--random"]) \
        + (["--limit", str(args.limit)] if args.limit else []) + (["--allow-unverified"] if args.allow_unverified else [])
    baselines, reports = {}, []
    for i, path in enumerate(files):
        suffix = path.suffix.lower()
        if suffix not in baselines:
            base = child_json(["rss-baseline", suffix], f"{suffix} runtime")
            baselines[suffix] = base.get("peak_rss_mb")
        report = child_json(["bench", str(path), *common], path.name)
        report.update(file=path.name, sha256=file_sha256(path))
        peak, base = report.get("peak_rss_mb"), baselines[suffix]
        report["ram_mb"] = None if peak is None or base is None else max(0.0, peak - base)
        reports.append(report)
        if "error" in report:
            print(f"[{i + 1}/{len(files)}] {path.name}: {report['error']}", file=sys.stderr)
        else:
            lat = report["results"][0]["invoke_ms"]
            print(f"[{i + 1}/{len(files)}] {path.name}: invoke p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms, "
                  f"ram {report['ram_mb'] if report['ram_mb'] is None else round(report['ram_mb'], 1)} MB")
    return {"format": "edgeft-bench-folder", "version": 1, "folder": str(args.model), "machine": machine_info(),
            "python": platform.python_version(), "latency_rule": LATENCY_RULE, "baseline_rss_mb": baselines,
            "files": reports}


def benchmark(args) -> dict:
    model_path = Path(args.model)
    if not model_path.is_file():
        raise DeviceError(f"model file not found: {model_path}")
    if model_path.suffix.lower() not in RUNNERS:
        raise DeviceError(f"expected a .tflite or .onnx file, got: {model_path}")
    if args.data is not None and not Path(args.data).is_dir():
        raise DeviceError(f"data folder not found: {args.data}")
    _check_json_path(args.json)
    images = None if args.data is None else class_images(args.data)   # fails fast, before the model loads
    runner = open_runner(model_path, args.threads[0])
    labels, source = model_labels(model_path, runner)
    data = acc = None
    if args.data is not None:
        items, labels, source = dataset(images, labels, source, runner.num_classes, args.limit)
        acc, pool, unreadable = accuracy(runner, items, labels)
        data = {"path": args.data, "images": len(items), "unreadable": unreadable}
    else:
        pool = random_pool(runner, args.seed)
    tensor_in, tensor_out = runner.tensor_info()
    size = model_path.stat().st_size
    report = {"model": str(model_path), "format": runner.format, "runtime": runner.runtime,
              "runtime_version": runner.runtime_version, "size_bytes": size, "size_mb": size / (1024 * 1024),
              "load_ms": runner.load_ms, "input": tensor_in, "output": tensor_out,
              "num_classes": runner.num_classes, "labels": labels, "labels_source": source,
              "python": platform.python_version(), "machine": machine_info(), "data": data,
              "latency_rule": LATENCY_RULE, "results": []}
    for i, threads in enumerate(args.threads):
        if i:
            runner = None   # free the previous interpreter / session before the next
            runner = open_runner(model_path, threads)
        report["results"].append(thread_result(runner, threads, pool, args.runs, args.warmup))
    report["peak_rss_mb"] = peak_rss_mb()
    report["accuracy"] = acc
    return report


def table(header, rows) -> str:
    """Right-aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


def bench_summary(report) -> str:
    tensor, rss = report["input"], report["peak_rss_mb"]
    q = tensor["quantization"]
    lines = [f"model     {report['model']}  ({report['size_mb']:.3f} MB, {report['runtime']} "
             f"{report['runtime_version']})",
             f"input     {tensor['shape']} {tensor['dtype']}"
             + ("" if q is None else f" (scale {q['scale']:.6g}, zero_point {q['zero_point']})"),
             f"load      {report['load_ms']:.1f} ms",
             f"peak RSS  {'n/a' if rss is None else f'{rss:.1f} MB'}",
             f"machine   {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, "
             f"Python {report['python']}"]
    acc = report["accuracy"]
    if acc is not None:
        lines += [f"accuracy  top-1 {acc['top1']:.2%} ({acc['correct']}/{acc['n']}) on {report['data']['path']} "
                  f"n={acc['n']}, labels from "
                  f"{report['labels_source']}, {report['data']['unreadable']} unreadable image(s) skipped", "",
                  table(["class", "n", "correct", "top1"],
                        [[label, c["n"], c["correct"], f"{c['top1']:.2%}"] for label, c in acc["per_class"].items()])]
    lines += ["", "latency (ms, batch 1): invoke = the runtime call alone (invoke_ms); end-to-end = pixels to "
                  "probabilities, quantize + invoke + dequantize (end_to_end_ms)", "",
              table(["threads", "runs", "timed", "mean", "p50", "p90", "p95", "p99", "min", "max", "std", "outliers",
                     "img/s"],
                    [[r["threads"], r["runs"], name.removesuffix("_ms").replace("_", "-")]
                     + [f"{r[name][k]:.3f}" for k in ("mean", "p50", "p90", "p95", "p99", "min", "max", "std")]
                     + [r["outliers_removed"][name],
                        f"{1000.0 / r[name]['mean']:.1f}"]
                     for r in report["results"] for name in TIMED])]
    return "\n".join(lines)


# ================================================================================================
# 9. predict: top classes of images
# ================================================================================================

def top_classes(probs, labels, top_k: int) -> list[dict]:
    """The `top_k` classes of one probability vector, most probable first. Tied scores keep their
    class-id order (a stable sort), so every predict path (this script's, `edgeft predict`) lists
    ties alike; classes without a label are shown by their class id."""
    probs = np.asarray(probs).reshape(-1)
    order = np.argsort(-probs, kind="stable")[:top_k]
    return [{"label": labels[i] if labels and i < len(labels) else str(i), "class_id": int(i),
             "probability": float(probs[i])} for i in order]


def predict_images(runner, paths, labels, top_k: int) -> list[dict]:
    """[{"image", "top": top_classes(...)}] for each image file, decoded by `load_image` at the
    runner's size and run one at a time (batch 1, as on a device); any runner with `predict(batch)`."""
    results = []
    for path in paths:
        try:
            pixels = load_image(path, runner.input_hw)
        except IMAGE_ERRORS as e:
            raise DeviceError(f"cannot read image {path}: {first_line(e)}") from None
        probs = runner.predict(pixels[None].astype(np.float32))[0]
        results.append({"image": str(path), "top": top_classes(probs, labels, top_k)})
    return results


def predict(model, images, top_k: int = 3, threads: int | None = None) -> list[dict]:
    """Top-k classes with probabilities for each image (folders: every image inside)."""
    paths = image_files(images)
    runner = open_runner(model, threads)
    labels, source = model_labels(model, runner)
    warning = labels_warning(labels, runner.num_classes, model, source)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return predict_images(runner, paths, labels, top_k)


def print_predictions(results: list[dict], as_json: bool) -> None:
    """`predict` output: JSON, or one line per image with its top classes."""
    if as_json:
        print(json.dumps(json_safe(results), indent=2, allow_nan=False))
        return
    for r in results:
        print(r["image"] + ": " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"]))


# ================================================================================================
# 10. verify: a model against the export's golden vectors
# ================================================================================================

def read_golden(golden_dir) -> dict:
    """expected.json of a golden folder, checked enough that verify cannot trip over it."""
    root = Path(golden_dir)
    if not root.is_dir():
        raise DeviceError(f"golden folder not found: {root}")
    path = root / GOLDEN_FILE
    if not path.is_file():
        raise DeviceError(f"{root} has no {GOLDEN_FILE}: not a golden folder (edgeft export writes export/golden/)")
    try:
        golden = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DeviceError(f"{path} is not valid JSON: {first_line(e)}") from None
    if not isinstance(golden, dict) or golden.get("format") != GOLDEN_FORMAT:
        raise DeviceError(f"{path} is not an edgeft golden file")
    if golden.get("version") != GOLDEN_VERSION:
        raise DeviceError(f"{path}: golden version {golden.get('version')!r}, this script reads {GOLDEN_VERSION}")
    try:
        golden["image_size"] = [int(v) for v in golden["image_size"]]
        inputs, files = golden["inputs"], golden["files"]
        for item in inputs:
            str(item["file"]), str(item["pixels_sha256"])
        if not (isinstance(files, dict) and inputs and len(golden["image_size"]) == 2):   # no assert: -O drops it
            raise ValueError("malformed")
    except (KeyError, TypeError, ValueError):
        raise DeviceError(f"{path}: missing or malformed image_size / inputs / files") from None
    labels = golden.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(v, str) for v in labels)):
        raise DeviceError(f"{path}: \"labels\" must be a list of class names, not {type(labels).__name__} "
                          f"{str(labels)[:40]}: export again, or repair the file")
    for item in inputs:
        golden_input(root, item["file"])
    return golden


def golden_input(root: Path, name: str) -> Path:
    """The golden input file `name` of `root`: a relative path that stays inside the golden
    folder (no absolute path, no `..`, no link out of it), and a file."""
    rel = Path(name)
    path = root / rel
    inside = not rel.is_absolute() and ".." not in rel.parts and not rel.drive
    if inside:
        try:
            inside = path.resolve().is_relative_to(root.resolve())
        except (OSError, ValueError):
            inside = False
    if not inside:
        raise DeviceError(f"{root / GOLDEN_FILE}: golden input {name!r} is outside the golden folder {root}: "
                          f"refused (inputs are relative paths inside it, e.g. inputs/000.png)")
    if not path.is_file():
        raise DeviceError(f"golden input missing: {path}")
    return path


def golden_entry(golden: dict, name: str, where) -> dict:
    entry = golden["files"].get(name)
    if entry is None:
        known = ", ".join(sorted(golden["files"])) or "none"
        raise DeviceError(f"{where} has no outputs for {name} (it has: {known}); --name picks one")
    try:
        outputs = np.asarray(entry["outputs"], dtype=np.float64)
        bound = float(entry["max_abs_diff"])
        top1 = bool(entry["top1_must_match"])
    except (KeyError, TypeError, ValueError):
        raise DeviceError(f"{where}: malformed entry for {name}") from None
    if outputs.ndim != 2 or len(outputs) != len(golden["inputs"]):
        raise DeviceError(f"{where}: the outputs for {name} do not match its {len(golden['inputs'])} inputs")
    # NaN compares False with everything: a NaN bound or NaN expected outputs would let any model pass
    if not math.isfinite(bound) or bound < 0:
        raise DeviceError(f"{where}: max_abs_diff for {name} must be a finite number >= 0, got {bound}")
    if not np.all(np.isfinite(outputs)):
        raise DeviceError(f"{where}: the expected outputs for {name} hold non-finite values (NaN or inf): "
                          f"not golden vectors edgeft wrote; export again")
    return {**entry, "outputs": outputs, "max_abs_diff": bound, "top1_must_match": top1}


def verify(model, golden_dir, name: str | None = None, threads: int | None = None) -> dict:
    """Replays the golden vectors: {"passed", "failures", "inputs": [...], ...} (raises DeviceError on bad input)."""
    model, root = Path(model), Path(golden_dir)
    if not model.is_file():
        raise DeviceError(f"model file not found: {model}")
    golden = read_golden(root)
    name = name or model.name
    entry = golden_entry(golden, name, root / GOLDEN_FILE)
    runner = open_runner(model, threads)
    expected, bound, top1 = entry["outputs"], entry["max_abs_diff"], entry["top1_must_match"]
    labels = golden.get("labels") or []
    h, w = golden["image_size"]
    result = {"model": str(model), "name": name, "golden": str(root), "tier": entry.get("tier"),
              "max_abs_diff_allowed": bound, "top1_must_match": top1, "runtime": f"{runner.runtime} "
              f"{runner.runtime_version}", "export_runtime": entry.get("runtime"),
              "same_file_as_export": entry.get("sha256") == file_sha256(model) if entry.get("sha256") else None,
              "inputs": [], "failures": []}
    fails = result["failures"]
    if tuple(runner.input_hw) != (h, w):
        fails.append(f"the model takes {runner.input_hw[0]}x{runner.input_hw[1]} images, the golden inputs are {h}x{w}")
    if runner.num_classes != expected.shape[1]:
        fails.append(f"the model has {runner.num_classes} outputs, the golden outputs {expected.shape[1]}")
    if fails:
        result["passed"] = False
        return result

    def name_of(k):
        return labels[k] if k < len(labels) else str(k)

    for i, item in enumerate(golden["inputs"]):
        row = {"file": item["file"], "pixels_match": False}
        result["inputs"].append(row)
        try:
            pixels = load_image(root / item["file"], (h, w))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            fails.append(f"{item['file']}: cannot decode here: {first_line(e)}")
            continue
        row["pixels_match"] = pixels_sha256(pixels) == item["pixels_sha256"]
        turned = file_orientation(root / item["file"]) if not row["pixels_match"] else 1
        written_by = golden.get("decoder_version", 1)   # absent: written before the decoder had versions
        if turned != 1 and isinstance(written_by, int) and written_by < DECODER_VERSION:
            fails.append(f"{item['file']}: decoded pixels differ from export time because the image carries EXIF "
                         f"orientation {turned}: these golden vectors were written by decoder version "
                         f"{written_by}, which ignored it; this one (version {DECODER_VERSION}) "
                         f"turns the image upright, as training now does. Export again (edgeft export) for "
                         f"golden vectors of this decoder")
        elif not row["pixels_match"] and isinstance(written_by, int) and written_by < DECODER_VERSION:
            fails.append(f"{item['file']}: decoded pixels differ from export time: these golden vectors were "
                         f"written by decoder version {written_by}, this one is version {DECODER_VERSION} "
                         f"(16-bit images: now scaled by their bit depth, no longer by their own maximum). "
                         f"Export again (edgeft export) for golden vectors of this decoder")
        elif not row["pixels_match"]:
            fails.append(f"{item['file']}: decoded pixels differ from export time (image decoding / resizing on "
                         f"this device is not the one the model was checked with: Pillow {Image.__version__})")
        probs = runner.predict(pixels[None].astype(np.float32))[0].astype(np.float64)
        finite = bool(np.all(np.isfinite(probs)))
        diff = float(np.max(np.abs(probs - expected[i]))) if finite else None
        got, want = int(np.argmax(probs)), int(np.argmax(expected[i]))
        row.update({"top1": name_of(got), "expected_top1": name_of(want), "probability": float(probs[got]),
                    "expected_probability": float(expected[i][want]), "max_abs_diff": diff})
        if diff is None:
            fails.append(f"{item['file']}: the model gave non-finite outputs")
        elif diff > bound:
            fails.append(f"{item['file']}: max |Δprob| {diff:.2e} > {bound:.0e}")
        if top1 and got != want:
            fails.append(f"{item['file']}: top-1 {name_of(got)}, expected {name_of(want)}")
    diffs = [r.get("max_abs_diff") for r in result["inputs"]]
    result["worst_abs_diff"] = None if None in diffs or not diffs else max(diffs)
    result["passed"] = not fails
    return result


def verify_summary(result) -> str:
    tier = (f"{result['tier']} tier: max |Δprob| <= {result['max_abs_diff_allowed']:g}"
            + (", same top-1" if result["top1_must_match"] else ""))
    same = {True: "the same file as at export", False: "not byte-identical to the exported file",
            None: "no export checksum"}[result["same_file_as_export"]]
    lines = [f"verify    {result['model']} as {result['name']} ({same}), {result['runtime']} "
             f"(export: {result['export_runtime']})"]
    if result["inputs"]:
        lines += ["", table(["input", "pixels", "top-1", "p", "expected", "p_expected", "max|Δp|"],
                            [[r["file"], "same" if r["pixels_match"] else "DIFFER", r.get("top1", "-"),
                              f"{r['probability']:.4f}" if "probability" in r else "-", r.get("expected_top1", "-"),
                              f"{r['expected_probability']:.4f}" if "expected_probability" in r else "-",
                              "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.2e}"]
                             for r in result["inputs"]]),
                  ""]
    if result["passed"]:
        lines.append(f"PASS: {len(result['inputs'])} golden inputs within the {tier} "
                     f"(worst {result['worst_abs_diff']:.2e})")
    else:
        lines.append(f"FAIL ({tier}):")
        lines += [f"  {f}" for f in result["failures"]]
    return "\n".join(lines)


# ================================================================================================
# 11. main: the sub-command, its errors as one line
# ================================================================================================

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "rss-baseline":
        report = rss_baseline(args.runtime)
        if args.json:
            write_json_atomic(args.json, report)
        return 0
    if Path(args.model).is_file():
        problem = check_manifest(args.model)
        if problem and problem.startswith("warning:"):
            print(problem, file=sys.stderr)
        elif problem and getattr(args, "allow_unverified", False):
            print(f"warning: {problem} (run anyway: --allow-unverified)", file=sys.stderr)
        elif problem:
            hint = "; --allow-unverified runs it anyway" if hasattr(args, "allow_unverified") else ""
            print(f"error: {problem}{hint}", file=sys.stderr)
            return 1
    try:
        if args.command == "bench" and Path(args.model).is_dir():
            report = bench_folder(args)
            failed = [r["file"] for r in report["files"] if "error" in r]
            if args.json is not None:
                write_json_atomic(args.json, report)
                print(f"wrote {args.json} ({len(report['files'])} files)")
            return 1 if failed else 0
        if args.command == "bench":
            report = benchmark(args)
            print(bench_summary(report))
            if args.json is not None:
                write_json_atomic(args.json, report)
                print(f"\nwrote {args.json}")
            return 0
        if args.command == "predict":
            print_predictions(predict(args.model, args.images, args.top_k, args.threads), args.json)
            return 0
        _check_json_path(args.json)
        result = verify(args.model, args.golden, args.name, args.threads)
        print(verify_summary(result))
        if args.json is not None:
            write_json_atomic(args.json, result)
        return 0 if result["passed"] else 1
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a write that failed part way (full disk): one line, exit 1
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{os.strerror(e.errno) if e.errno else e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
