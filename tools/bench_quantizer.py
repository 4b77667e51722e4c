#!/usr/bin/env python
"""The LiteRT Quantizer (ai-edge-quantizer) against the TFLite converter's quantization, on one run.

    python tools/bench_quantizer.py RUN [--aeq /tmp/aeq] [--parity-inputs N] [--runs 30] [--json out.json]

Dev-machine script (needs TensorFlow, edgeft, and ai-edge-quantizer importable: `--aeq DIR` puts a
`pip install --target DIR ai-edge-quantizer` first on the path, so the project's venv is unchanged).
Every file is made from the run's float model with the same calibration images as `edgeft export`
(the run's --rep-samples training images, plus an all-0 and an all-255 image), and judged on the
run's parity inputs against the float Keras model:

  converter int8 / int8 per-tensor / 16x8: tf.lite.TFLiteConverter's post-training quantization
    (edgeft's model_int8.tflite: uint8 input and output; 16x8: float32 I/O);
  aeq a8w8 / a8w8 per-tensor / a16w8: ai_edge_quantizer.Quantizer on edgeft's float .tflite file
    (recipe static_wi8_ai8 / the same with TENSORWISE weights / static_wi8_ai16), its default
    calibration (a moving average of each image's min and max) or, "min/max", the min and max over
    all calibration images; its files take and give integers (int8, or int16 for a16w8) with the
    scale it calibrated for the input.

Per file: size, accuracy (LiteRT, default resolver), top-1 agreement with float Keras (all inputs,
and on the clear inputs: float's top-1 margin >= the gate's clear margin), max |Δprob|, p50 latency
(batch 1, one thread, the device script's `time_runner`), whether edgeft's TFLite metadata can be
written and MediaPipe's ImageClassifier loads the file and names its classes, and whether TensorFlow
Lite Micro loads and runs it (one input, in a child process). Prints a Markdown table, then JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INT16X8 = ("EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--aeq", help="a folder holding ai_edge_quantizer (pip install --target DIR), put first on sys.path")
    p.add_argument("--parity-inputs", type=int, help="judge on this many parity inputs (default: the run's)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per file (default 30)")
    p.add_argument("--mediapipe-inputs", type=int, default=20, help="inputs MediaPipe classifies (default 20)")
    p.add_argument("--only", help="comma-separated file keys to make (default: all)")
    p.add_argument("--json", help="also write the JSON here")
    return p


# ---------------------------------------------------------------- the files
def aeq_file(float_tflite: bytes, rep: np.ndarray, kind: str, minmax: bool = False) -> bytes:
    """`minmax`: each tensor's range is the min and max over all calibration images (as the converter
    calibrates) instead of the Quantizer's default, a moving average of each image's min and max
    (smoothing 0.95, qsv_utils.moving_average_update), which Quantizer.calibrate does not let one change."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, quantizer, recipe
    from ai_edge_quantizer.utils import qsv_utils

    qt = quantizer.Quantizer(bytearray(float_tflite))
    rp = recipe.static_wi8_ai16() if kind == "a16w8" else recipe.static_wi8_ai8()
    if kind == "a8w8-tensor":
        for entry in rp:
            entry["op_config"]["weight_tensor_config"]["granularity"] = "TENSORWISE"
    qt.load_quantization_recipe(rp)
    sig = Interpreter(model_content=float_tflite).get_signature_list()
    key = next(iter(sig))
    name = sig[key]["inputs"][0]
    data = {key: [{name: img[None].astype(np.float32)} for img in rep]}
    if minmax:
        cal = calibrator.Calibrator(qt._float_model_buffer, num_threads=1,   # noqa: SLF001
                                    qsv_update_func=qsv_utils.min_max_update)
        cal.calibrate(data, qt._recipe_manager)   # noqa: SLF001
        calib = cal.get_model_qsvs()
    else:
        calib = qt.calibrate(data, num_threads=1)
    return bytes(qt.quantize(calib, enable_progress_report=False).quantized_model)


def make_files(model, rep: np.ndarray, io: str, only: set[str] | None) -> dict[str, bytes | str]:
    """key -> bytes (or the one-line reason it could not be made)."""
    from edgeft.export import keras2tflite as k
    from edgeft.export.tflite_metadata import strip_associated_files

    float_tflite = strip_associated_files(k.tflite_float(model))
    calib = np.concatenate([k.full_range_images(rep), rep])
    makers = {
        "float": lambda: float_tflite,
        "converter int8": lambda: k.tflite_int8(model, rep, io, "per-channel"),
        "converter int8 per-tensor": lambda: k.tflite_int8(model, rep, io, "per-tensor"),
        "converter 16x8": lambda: k._convert(k.quantized_converter(model, rep, None, ops=INT16X8, label="16x8")),  # noqa: SLF001
        "aeq a8w8": lambda: aeq_file(float_tflite, calib, "a8w8"),
        "aeq a8w8 per-tensor": lambda: aeq_file(float_tflite, calib, "a8w8-tensor"),
        "aeq a16w8": lambda: aeq_file(float_tflite, calib, "a16w8"),
        "aeq a8w8 min/max": lambda: aeq_file(float_tflite, calib, "a8w8", minmax=True),
        "aeq a8w8 per-tensor min/max": lambda: aeq_file(float_tflite, calib, "a8w8-tensor", minmax=True),
        "aeq a16w8 min/max": lambda: aeq_file(float_tflite, calib, "a16w8", minmax=True),
    }
    out = {}
    for key, make in makers.items():
        if only and key not in only:
            continue
        t = time.monotonic()
        try:
            out[key] = make()
        except Exception as e:   # noqa: BLE001 - a quantizer's refusal is a result
            out[key] = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        print(f"# made {key} in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- the measurements
def tflm_check(path: Path) -> str:
    """'runs' or TensorFlow Lite Micro's one-line reason (one input, generous arena, child process)."""
    from edgeft.export.tflm import _tflm_failure, flatbuffer_bytes

    code = ("import sys, numpy as np\nfrom tflite_micro.python.tflite_micro import runtime\n"
            "fb = open(sys.argv[1], 'rb').read()\n"
            "it = runtime.Interpreter.from_bytes(fb, arena_size=64 << 20)\n"
            "d = it.get_input_details(0)\nit.set_input(np.zeros(d['shape'], d['dtype']), 0)\nit.invoke()\n"
            "print('TFLM-OK')\n")
    with tempfile.TemporaryDirectory() as tmp:
        fb = Path(tmp) / "m.tflite"
        fb.write_bytes(flatbuffer_bytes(path.read_bytes()))
        proc = subprocess.run([sys.executable, "-c", code, str(fb)], capture_output=True, text=True, timeout=900)
    if "TFLM-OK" in proc.stdout:
        return "runs"
    return _tflm_failure(proc.stdout + proc.stderr) or f"exit {proc.returncode}"


def mediapipe_check(path: Path, x: np.ndarray, labels: list[str], litert_top1: np.ndarray) -> str:
    from edgeft.verify.clients import mediapipe_classifier

    try:
        out = mediapipe_classifier(path, x)
    except Exception as e:   # noqa: BLE001
        return "fails: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    names = "names from file" if out.names == labels else "names differ"
    return f"runs, top-1 = LiteRT {np.mean(out.top1 == litert_top1[:len(out.top1)]):.0%}, {names}"


def measure(key: str, data: bytes, x, y, float_probs, clear, labels, runs: int, mp_inputs: int, tmp: Path) -> dict:
    from edgeft.device import open_runner, time_runner
    from edgeft.export.tflite_metadata import with_metadata

    path = tmp / (re.sub(r"[^A-Za-z0-9.-]+", "_", key) + ".tflite")
    row = {"file": key, "size_bytes": len(data)}
    try:   # edgeft's metadata (MediaPipe's writer), then the file must still load in LiteRT
        with_md = with_metadata(data, labels, name="bench", version="bench", description="bench")
        path.write_bytes(with_md)
        open_runner(path, threads=1)
        row["metadata"], data = "written, loads", with_md
    except Exception as e:   # noqa: BLE001 - the file is measured without it
        row["metadata"] = "breaks it: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
    path.write_bytes(data)
    runner = open_runner(path, threads=1)
    row["io"] = f"{runner.tensor_info()[0]['dtype']} / {runner.tensor_info()[1]['dtype']}"
    probs = runner.predict(x)
    top = probs.argmax(-1)
    row |= {"accuracy": float(np.mean(top == y)), "float_accuracy": float(np.mean(float_probs.argmax(-1) == y)),
            "agreement": float(np.mean(top == float_probs.argmax(-1))),
            "clear_agreement": float(np.mean((top == float_probs.argmax(-1))[clear])) if clear.any() else None,
            "n": int(len(y)), "n_clear": int(clear.sum()),
            "max_abs_diff": float(np.max(np.abs(probs - float_probs)))}
    rng = np.random.default_rng(0)
    pool = list(x[rng.permutation(len(x))[:8]])
    t = time_runner(runner, pool, runs, max(3, runs // 10))
    row["p50_ms"] = float(t["invoke_ms"]["p50"]) if isinstance(t.get("invoke_ms"), dict) else None
    row["mediapipe"] = mediapipe_check(path, x[:mp_inputs], labels, top)
    row["tflm"] = tflm_check(path)
    return row


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.aeq:
        sys.path.insert(0, args.aeq)

    from edgeft.core.config import build_config, from_yaml_file
    from edgeft.core.tiers import clear_mask
    from edgeft.data.datasets import gate_inputs, representative_images
    from edgeft.nn.model import load_model
    from edgeft.quantize.int8_choice import keras_probs
    from edgeft.run import run_splits

    run = Path(args.run)
    cfg = from_yaml_file(run / "config.yaml")
    if args.parity_inputs:
        cfg = build_config({"parity_inputs": args.parity_inputs}, base=cfg)
    splits = run_splits(cfg)
    inputs = gate_inputs(splits.val, cfg)
    x, y = inputs.x, inputs.y
    rep = representative_images(splits.train, cfg.export.rep_samples, cfg.train.seed)
    model = load_model(run / "model.keras")
    float_probs = keras_probs(model, x)
    clear = clear_mask(float_probs, cfg.parity.clear_margin)
    files = make_files(model, rep, cfg.export.int8_io, set(args.only.split(",")) if args.only else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantizer-") as tmp:
        for key, data in files.items():
            if isinstance(data, str):
                rows.append({"file": key, "error": data})
            else:
                try:
                    rows.append(measure(key, data, x, y, float_probs, clear, list(splits.classes), args.runs,
                                        args.mediapipe_inputs, Path(tmp)))
                except Exception as e:   # noqa: BLE001 - a file LiteRT cannot load is a result too
                    rows.append({"file": key, "error": "LiteRT: " + (str(e).strip().splitlines() or ["?"])[0][-160:]})
            print(f"# measured {key}", file=sys.stderr, flush=True)
    print(f"\n{run.name}: {len(y)} parity inputs ({int(clear.sum())} clear), {len(rep)} calibration images, "
          f"float Keras accuracy {np.mean(float_probs.argmax(-1) == y):.4f}\n")
    print("| file | I/O | size (KB) | accuracy | agreement with float (clear) | max Δprob | p50 ms | metadata | "
          "MediaPipe | TFLite Micro |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['file']} | not made: {r['error']} |||||||||")
            continue
        clear_text = "-" if r["clear_agreement"] is None else f"{r['clear_agreement']:.1%}"
        print(f"| {r['file']} | {r['io']} | {r['size_bytes'] / 1000:.0f} | {r['accuracy']:.4f} | {r['agreement']:.1%} "
              f"({clear_text}) | {r['max_abs_diff']:.3f} | {r['p50_ms']:.2f} | {r['metadata']} | {r['mediapipe']} | "
              f"{r['tflm']} |")
    report = {"run": str(run), "n": int(len(y)), "n_clear": int(clear.sum()), "calibration_images": int(len(rep)),
              "rows": rows}
    print("\n" + json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
