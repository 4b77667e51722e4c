"""The export formats table (as Ultralytics' `export_formats()`): one row per file edgeft writes.

Shared by export (which builds each row), parity (which gates it) and bench (which times it);
it imports nothing of theirs (the runner of each row is edgeft.verify.runners), so it stays in
the TF-free ground and those stages never import one another.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeft.core.rundir import EXPORT_DIR  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Format:
    name: str          # e.g. "tflite_int8"
    family: str        # "tflite", "onnx" or "tflm": the CLI flag it belongs to
    flag: str          # value of --tflite / --onnx (tflm: --tflm)
    filename: str
    tier: str          # parity tier: "float", "fp16", "dynamic" or "int8"
    builder: str       # name of the function in edgeft.pipeline.exporter that makes the file's bytes
    runtime: str       # who runs it in the gate: "litert", "onnxruntime" or "tflm"


FORMATS: tuple[Format, ...] = (
    Format("tflite_float", "tflite", "float", "model_float.tflite", "float", "tflite_float", "litert"),
    Format("tflite_fp16", "tflite", "fp16", "model_fp16.tflite", "fp16", "tflite_fp16", "litert"),
    Format("tflite_dynamic", "tflite", "dynamic", "model_dynamic.tflite", "dynamic", "tflite_dynamic", "litert"),
    Format("tflite_int8", "tflite", "int8", "model_int8.tflite", "int8", "tflite_int8", "litert"),
    Format("onnx_float", "onnx", "float", "model.onnx", "float", "onnx_float", "onnxruntime"),
    Format("onnx_int8", "onnx", "int8", "model_int8.onnx", "int8", "onnx_int8", "onnxruntime"),
    # the int8 TFLite file again, run by the TensorFlow Lite Micro interpreter; C sources in export/tflm/
    Format("tflm_int8", "tflm", "int8", "model_int8.tflite", "int8", "tflite_int8", "tflm"),
)
TFLM_DIR = "tflm"


def select_formats(tflite: list[str] | None, onnx: list[str] | None, tflm: bool = False) -> list[Format]:
    """Rows for `--tflite ... --onnx ... --tflm`; no --tflite/--onnx means every TFLite and ONNX
    format (TFLite Micro only when asked: tflite-micro has Linux x86-64 wheels only)."""
    from edgeft.core.errors import UserError

    wanted = {"tflite": tflite or [], "onnx": onnx or [], "tflm": ["int8"] if tflm else []}
    if not tflite and not onnx:
        wanted |= {"tflite": ["all"], "onnx": ["all"]}
    chosen = []
    for family, flags in wanted.items():
        known = {f.flag for f in FORMATS if f.family == family}
        unknown = sorted(set(flags) - known - {"all"})
        if unknown:
            raise UserError(f"--{family} {', '.join(unknown)}: choose from {', '.join(sorted(known))} or all")
        chosen += [f for f in FORMATS if f.family == family and ("all" in flags or f.flag in flags)]
    return chosen
