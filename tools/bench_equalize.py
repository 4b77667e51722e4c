#!/usr/bin/env python
"""Per-tensor int8 with and without cross-layer equalization and bias correction (issue 30 item 4(b)).

    python tools/bench_equalize.py RUN [--json out.json] [--no-int8]

Dev-machine script (needs TensorFlow and edgeft). On one trained run: the float model, its folded
and equalized float copies (each ReLU6 option of edgeft.quantize.equalize), and the int8 TFLite files
(per-tensor naive, + equalization, + equalization and bias correction, bias correction alone,
per-channel), each run by LiteRT. Accuracy on the run's test split, top-1 agreement with float Keras
on the test split and on the parity inputs where float is clear (top-1 minus second >= the run's
clear margin), size, p50 invoke latency (batch 1, one thread, the device script's rule).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("run")
    ap.add_argument("--json")
    ap.add_argument("--no-int8", action="store_true", help="float rows only (the ReLU6 options)")
    ap.add_argument("--parity-inputs", type=int, default=300,
                    help="the first N parity inputs (validation images, then their copies; default 300)")
    return ap


def latency(data: bytes, pool: np.ndarray) -> float:
    import tempfile

    from edgeft import device

    fd, path = tempfile.mkstemp(suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return float(device.time_runner(device.open_runner(path, 1), pool, 20, 3)["invoke_ms"]["p50"])
    finally:
        os.unlink(path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from edgeft.core.config import from_yaml_file
    from edgeft.data.datasets import gate_inputs, representative_images
    from edgeft.export.keras2tflite import tflite_int8
    from edgeft.nn.model import load_model
    from edgeft.quantize import equalize as eq
    from edgeft.quantize.int8_choice import keras_probs, tflite_probs
    from edgeft.run import run_splits

    t0 = time.time()
    run = Path(args.run)
    cfg = from_yaml_file(run / "config.yaml")
    splits = run_splits(cfg)
    test_x = splits.test.read(np.arange(len(splits.test))).astype(np.float32)
    test_y = np.asarray(splits.test.y)
    inputs = gate_inputs(splits.val, cfg)
    par_x = inputs.x[:args.parity_inputs]
    rep = representative_images(splits.train, cfg.export.rep_samples, cfg.train.seed)
    model = load_model(run / "model.keras")
    f_test, f_par = keras_probs(model, test_x), keras_probs(model, par_x)
    top2 = np.sort(f_par, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= cfg.parity.clear_margin
    io = cfg.export.int8_io
    rows = []

    def row(name, kind, p_test, p_par, extra=None):
        r = {"name": name, "kind": kind, "test_accuracy": float(np.mean(p_test.argmax(-1) == test_y)),
             "test_agreement": float(np.mean(p_test.argmax(-1) == f_test.argmax(-1))),
             "clear_agreement": float(np.mean((p_par.argmax(-1) == f_par.argmax(-1))[clear])),
             "elapsed_s": round(time.time() - t0, 1)} | (extra or {})
        rows.append(r)
        print(f"{name}: test accuracy {r['test_accuracy']:.3f}, agreement with float {r['test_agreement']:.1%} (test), "
              f"{r['clear_agreement']:.1%} (clear parity inputs) [{r['elapsed_s']} s]", flush=True)

    row("Keras float", "float", f_test, f_par)
    folded = eq.fold_batchnorm(model)
    row("Keras float, BatchNorm folded", "float", keras_probs(folded, test_x), keras_probs(folded, par_x),
        {"max_prob_diff": float(np.abs(keras_probs(folded, par_x) - f_par).max())})
    models = {}
    for mode in eq.RELU6:
        m, pairs = eq.equalize(model, mode, images=rep)
        models[mode] = m
        row(f"Keras float, equalized (ReLU6: {mode})", "float", keras_probs(m, test_x), keras_probs(m, par_x),
            {"pairs": len(pairs)})
    bc = eq.equalized_model(model, rep)
    row("Keras float, equalized + bias corrected", "float", keras_probs(bc, test_x), keras_probs(bc, par_x))
    if not args.no_int8:
        only_bc = eq.fold_batchnorm(model)
        eq.correct_biases(only_bc, rep)
        pool = rep[:4]
        for name, m, gran in (("int8 per-channel", model, "per-channel"),
                              ("int8 per-tensor (naive)", model, "per-tensor"),
                              ("int8 per-tensor + bias correction", only_bc, "per-tensor"),
                              ("int8 per-tensor + equalization", models["clamp"], "per-tensor"),
                              ("int8 per-tensor + equalization + bias correction", bc, "per-tensor")):
            start = time.time()
            data = tflite_int8(m, rep, io, gran)
            built = time.time() - start
            row(name, gran, tflite_probs(data, test_x), tflite_probs(data, par_x),
                {"size_bytes": len(data), "p50_ms": latency(data, pool), "build_s": round(built, 1)})
    n_clear = int(clear.sum())
    print(f"\nrun {run}: test split {len(test_y)} images; {len(par_x)} parity inputs, {n_clear} clear "
          f"(margin >= {cfg.parity.clear_margin}); {len(rep)} calibration images; {io} I/O; {time.time() - t0:.0f} s "
          f"wall on {platform.node()}\n")
    print("| model | test accuracy | agreement with float (test) | agreement, clear parity inputs | size (MB) | p50 ms |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.3f}" if "size_bytes" in r else "-"
        p50 = f"{r['p50_ms']:.2f}" if "p50_ms" in r else "-"
        print(f"| {r['name']} | {r['test_accuracy']:.3f} | {r['test_agreement']:.1%} | {r['clear_agreement']:.1%} "
              f"| {size} | {p50} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "test_n": len(test_y), "parity_n": len(par_x),
                                               "clear_n": n_clear, "calibration_images": len(rep), "io": io,
                                               "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
                                               "wall_s": round(time.time() - t0, 1), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
