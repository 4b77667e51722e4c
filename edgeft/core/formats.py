"""The export formats table (as Ultralytics' `export_formats()`): one row per file edgeft writes.

Shared by export (which builds each row), parity (which gates it) and bench (which times it);
it imports nothing of theirs, so it stays in the TF-free ground and those stages never import one
another. Only data lives here: each row's builder registers itself under the row's name in
edgeft.export.builders (`@builds("tflite_int8")`), its runner is edgeft.verify.runners, its gate
tier is a row of edgeft.core.tiers.TIERS. Adding a format: a row here, a builder there, and a
tier row only when no existing tier judges it (docs/export.md, "Adding a format").
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
    tier: str          # parity tier: a key of edgeft.core.tiers.TIERS ("float", "fp16", "dynamic", "int8")
    runtime: str       # who runs it in the gate: "litert", "onnxruntime" or "tflm"
    search: bool = False   # `edgeft search --target FAMILY-FLAG` may ship it
    default: bool = True   # exported when no --tflite / --onnx is given (else only when named, or by `all`)
    recovers: str | None = None   # made only by int8 recovery (--int8-recover allow-mixed) of this row, never asked for


FORMATS: tuple[Format, ...] = (
    Format("tflite_float", "tflite", "float", "model_float.tflite", "float", "litert"),
    Format("tflite_fp16", "tflite", "fp16", "model_fp16.tflite", "fp16", "litert", search=True),
    Format("tflite_dynamic", "tflite", "dynamic", "model_dynamic.tflite", "dynamic", "litert"),
    Format("tflite_int8", "tflite", "int8", "model_int8.tflite", "int8", "litert", search=True),
    # int16 activations, int8 weights (LiteRT's 16x8 mode); float32 I/O: raw pixels 0-255 in, probabilities out
    Format("tflite_int16x8", "tflite", "int16x8", "model_int16x8.tflite", "int16x8", "litert", search=True,
           default=False),
    Format("onnx_float", "onnx", "float", "model.onnx", "float", "onnxruntime", search=True),
    Format("onnx_int8", "onnx", "int8", "model_int8.onnx", "int8", "onnxruntime", search=True),
    # the int8 TFLite file again, run by the TensorFlow Lite Micro interpreter; C sources in export/tflm/
    Format("tflm_int8", "tflm", "int8", "model_int8.tflite", "int8", "tflm", search=True),
    # an int8 file that failed the gate, recovered with its most sensitive ops kept float (edgeft.pipeline.recovery)
    Format("tflite_mixed", "tflite", "mixed", "model_mixed.tflite", "int8", "litert", default=False,
           recovers="tflite_int8"),
    Format("onnx_mixed", "onnx", "mixed", "model_mixed.onnx", "int8", "onnxruntime", default=False,
           recovers="onnx_int8"),
)
TFLM_DIR = "tflm"
# the TFLite file whose C sources export/tflm/ holds (they move with it to failed/ and go stale with it)
TFLM_FILE = next(f.filename for f in FORMATS if f.family == "tflm")


def flags_of(family: str) -> list[str]:
    """The values `--FAMILY` takes (its rows' flags), for help texts and refusals."""
    return [f.flag for f in FORMATS if f.family == family and not f.recovers]


def select_formats(tflite: list[str] | None, onnx: list[str] | None, tflm: bool = False) -> list[Format]:
    """Rows for `--tflite ... --onnx ... --tflm`; no --tflite/--onnx means every default TFLite and ONNX
    format (TFLite Micro only when asked: tflite-micro has Linux x86-64 wheels only; a row with
    default=False, e.g. 16x8, only when named or by `all`)."""
    from edgeft.core.errors import UserError

    wanted = {"tflite": tflite or [], "onnx": onnx or [], "tflm": ["int8"] if tflm else []}
    if not tflite and not onnx:
        wanted |= {fam: [f.flag for f in FORMATS if f.family == fam and f.default] for fam in ("tflite", "onnx")}
    chosen = []
    for family, flags in wanted.items():
        rows = [f for f in FORMATS if f.family == family and not f.recovers]
        known = {f.flag for f in rows}
        unknown = sorted(set(flags) - known - {"all"})
        if unknown:
            raise UserError(f"--{family} {', '.join(unknown)}: choose from {', '.join(sorted(known))} or all")
        chosen += [f for f in rows if "all" in flags or f.flag in flags]
    return chosen


# which int8 TFLite file ships when a run has a QAT model (edgeft.quantize.int8_choice.choose), said
# by parity.md, report.md and `edgeft qat`
INT8_RULE = ("QAT only when it passes the gate and is clearly more accurate than PTQ by LiteRT on the parity "
             "inputs (paired 95 % interval of its gain above 0); otherwise PTQ")
