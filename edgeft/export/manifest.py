"""export/manifest.json: what shipped, byte for byte, and how it was made.

For every file that passed the gate: sha256, size, format, int8 source, input/output contract,
its parity verdict with the numbers; for the export as a whole: toolchain versions, the
calibration images' fingerprint and seeds, and the sha256 of the model.keras it came from (so a
model replaced after export is caught). `check_manifest` finds files or a model.keras edited by
hand. Imports no TensorFlow.
"""
from __future__ import annotations

import hashlib
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from edgeft import device
from edgeft.core import rundir
from edgeft.core.errors import UserError

MANIFEST = device.MANIFEST
TOOLCHAIN = ("edgeft", "tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert", "onnxruntime",
             "tf2onnx", "onnx", "onnxslim", "mediapipe", "tflite-micro")


sha256_file = device.file_sha256   # the device script's hash: one definition for both sides


def fingerprint(images: np.ndarray) -> str:
    """sha256 of an image batch (shape, dtype and bytes): which calibration images were used."""
    a = np.ascontiguousarray(images)
    return hashlib.sha256(f"{a.shape}{a.dtype}".encode() + a.tobytes()).hexdigest()


def toolchain() -> dict[str, str | None]:
    out = {}
    for name in TOOLCHAIN:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def io_contract(path: Path) -> dict:
    """Input and output tensors as a device sees them (shape, dtype, quantization, layout)."""
    base = {"layout": "NHWC", "color": "RGB", "pixel_range": [0, 255]}
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(path))
        i, o = it.get_input_details()[0], it.get_output_details()[0]

        def one(d):
            scale, zp = d["quantization"]
            return {"shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                    "scale": float(scale), "zero_point": int(zp)}
        return {"input": one(i) | base, "output": one(o) | {"meaning": "class probabilities"}}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    i, o = sess.get_inputs()[0], sess.get_outputs()[0]
    return {"input": {"name": i.name, "shape": list(i.shape), "dtype": i.type} | base,
            "output": {"shape": list(o.shape), "dtype": o.type, "meaning": "class probabilities"}}


def build_manifest(export_dir: Path, run: Path, shipped: dict[str, dict], made_from: dict, extra: dict) -> dict:
    """shipped: file name -> its parity rows (dicts from parity.json)."""
    files = {}
    for name, rows in sorted(shipped.items()):
        path = export_dir / name
        files[name] = {"sha256": sha256_file(path), "size_bytes": path.stat().st_size,
                       "formats": [r["format"] for r in rows],
                       "int8_source": next((r["made_from"] for r in rows if r.get("made_from", "-") != "-"), None),
                       **io_contract(path),
                       # False: shipped by --accept-unjudged with a criterion on too few inputs (parity[].not_judged)
                       "judged": not any(r.get("accepted_unjudged") for r in rows),
                       "parity": [{k: r[k] for k in ("format", "runtime", "tier", "passed", "reference", "agreement",
                                                     "agreement_interval", "n", "max_abs_diff", "accuracy",
                                                     "accuracy_drop")}
                                  # criteria too few inputs judged, shipped by --accept-unjudged (docs/export.md)
                                  | {"not_judged": r.get("unjudged", []) if r.get("accepted_unjudged") else []}
                                  for r in rows]}
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": run.name,
            "model_keras_sha256": sha256_file(run / rundir.MODEL), "toolchain": toolchain(),
            "int8_choice": made_from.get("int8_choice"), **extra, "files": files}


def write_manifest(export_dir: Path, manifest: dict) -> None:
    rundir.write_json(export_dir / MANIFEST, manifest)


def check_manifest(run: Path, export_dir: Path) -> list[str]:
    """Problems with RUN/export against its manifest: shipped files missing or changed (the device
    script's rule, `device.entry_problem`), a model.keras replaced after export. Empty when there
    is no manifest or all is as exported."""
    path = export_dir / MANIFEST
    if not path.is_file():
        return []
    files = device.manifest_files(path)
    if files is None:
        return [f"{path} is not a valid edgeft manifest"]
    problems = [p for name, entry in files.items() for p in [device.entry_problem(export_dir / name, entry, path)] if p]
    man = rundir.read_json(path)
    keras = run / rundir.MODEL
    if keras.is_file() and man.get("model_keras_sha256") and sha256_file(keras) != man["model_keras_sha256"]:
        problems.append("model.keras was replaced after export: re-export before trusting export/")
    return problems


def require_manifest_ok(run: Path, export_dir: Path) -> None:
    problems = check_manifest(run, export_dir)
    if problems:
        raise UserError(f"{export_dir}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def manifest_entry(model_path: str | Path) -> tuple[bool, str]:
    """(trusted, why) for a model file: listed in a manifest beside it with the same sha256."""
    p = Path(model_path)
    if not (p.parent / MANIFEST).is_file():
        return False, f"{p.name} has no {MANIFEST} beside it: not a gated edgeft export"
    problem = device.check_manifest(p)   # the device script's rule, so both sides say the same
    return (False, problem.removeprefix("warning: ")) if problem else (True, "ok")
