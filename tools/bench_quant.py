#!/usr/bin/env python
"""Float / PTQ / QAT x per-channel / per-tensor on one run: accuracy by LiteRT, agreement with
float Keras and with each file's source, and what each QAT fidelity fix is worth.

    python tools/bench_quant.py RUN [--qat-epochs 2] [--lr 1e-5] [--sweep] [--json out.json]

Dev-machine script (needs TensorFlow and edgeft). Every number is measured on the run's parity
inputs (validation split + deterministic augmented copies, --parity-inputs of them).

Fidelity (first table): the QAT model is built, its ranges set, and NOT trained (learning rate
0), then converted; "agreement" is top-1 agreement between the QAT Keras model and its int8 file
under LiteRT's default (XNNPACK) kernels and under its reference kernels. The last column is
the same file under the two kernel sets: how far two correct int8 implementations of one file
already disagree on these inputs (the noise floor no simulation can beat).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def litert_probs(data: bytes, x: np.ndarray, reference: bool = False) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgeft.nn.runtime import dequantize, quantize

    fd, path = tempfile.mkstemp(suffix=".tflite")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        kw = {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF} if reference else {}
        it = Interpreter(model_path=path, **kw)
        it.allocate_tensors()
        i, o = it.get_input_details()[0], it.get_output_details()[0]
        out = []
        for img in x:
            it.set_tensor(i["index"], quantize(img[None], i["dtype"], *i["quantization"]))
            it.invoke()
            out.append(dequantize(it.get_tensor(o["index"]), *o["quantization"])[0])
        return np.stack(out)
    finally:
        os.unlink(path)


def top1(a, b) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def acc(p, y) -> float:
    return float(np.mean(p.argmax(-1) == y))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("run")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help="QAT learning rate (default: the run's lr_qat)")
    ap.add_argument("--parity-inputs", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="also QAT at lr 1e-5 / 1e-4 x freeze 0 / 1 epoch")
    ap.add_argument("--json")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from edgeft._keras import keras
    from edgeft.core.config import build_config, from_yaml_file
    from edgeft.export.keras2tflite import tflite_int8
    from edgeft.data.datasets import gate_inputs, make_dataset, representative_images
    from edgeft.quantize.int8_choice import keras_probs
    from edgeft.nn.model import load_model
    from edgeft.quantize.qat import build_qat_model, calibrate_ranges, train_qat
    from edgeft.run import run_splits
    from edgeft.core.stats import wilson_interval

    run = Path(args.run)
    cfg = from_yaml_file(run / "config.yaml")
    if args.parity_inputs:
        cfg = build_config({"parity_inputs": args.parity_inputs}, base=cfg)
    lr = args.lr if args.lr is not None else cfg.qat.lr_qat
    splits = run_splits(cfg)
    inputs = gate_inputs(splits.val, cfg)
    x, y, n = inputs.x, inputs.y, len(inputs.y)
    rep = representative_images(splits.train, cfg.export.rep_samples, cfg.train.seed)
    model = load_model(run / "model.keras")
    float_probs = keras_probs(model, x)
    io = cfg.export.int8_io
    t0 = time.time()

    def train_ds():
        return make_dataset(splits.train.x, splits.train.y, cfg.data.batch_size, True, cfg.data.augment,
                            cfg.train.seed)

    def val_ds():
        return make_dataset(splits.val.x, splits.val.y, cfg.data.batch_size)

    # ---- fidelity at learning rate 0: what each fix is worth
    fixes = [("tfmot defaults (ranges from [-6, 6] by EMA, 1 epoch at lr 0)", dict(exact_input=False,
              depthwise_per_channel=False), "ema"),
             ("+ ranges seeded from calibration images", dict(exact_input=False, depthwise_per_channel=False), "seed"),
             ("+ depthwise weights per channel", dict(exact_input=False, depthwise_per_channel=True), "seed"),
             ("+ exact 8-bit input path (all fixes: edgeft's QAT)", dict(), "seed")]
    fidelity = []
    for label, kw, ranges in fixes:
        qat = build_qat_model(model, "per-channel", **kw)
        if ranges == "seed":
            calibrate_ranges(qat, rep)
        else:
            qat.compile(keras.optimizers.Adam(0.0), "sparse_categorical_crossentropy")
            qat.fit(train_ds(), epochs=1, verbose=0)
        sim = keras_probs(qat, x)
        data = tflite_int8(qat, rep, io, "per-channel")
        xnn, ref = litert_probs(data, x), litert_probs(data, x, reference=True)
        row = {"variant": label, "n": n, "sim_vs_file_xnnpack": top1(sim, xnn), "sim_vs_file_reference": top1(sim, ref),
               "xnnpack_vs_reference": top1(xnn, ref)}
        fidelity.append(row)
        print(f"fidelity: {label}: {row['sim_vs_file_xnnpack']:.1%} (XNNPACK), {row['sim_vs_file_reference']:.1%} "
              f"(reference); XNNPACK vs reference {row['xnnpack_vs_reference']:.1%}", flush=True)

    # ---- accuracy: float / PTQ / QAT x granularity
    rows = [{"model": "Keras float", "granularity": "-", "accuracy": acc(float_probs, y), "agree_float": 1.0,
             "agree_source": None}]
    for gran in ("per-channel", "per-tensor"):
        p = litert_probs(tflite_int8(model, rep, io, gran), x)
        rows.append({"model": "int8 PTQ", "granularity": gran, "accuracy": acc(p, y), "agree_float": top1(p, float_probs),
                     "agree_source": top1(p, float_probs)})
        print(f"accuracy: PTQ {gran}: {rows[-1]['accuracy']:.4f}", flush=True)
    settings = [(lr, cfg.qat.qat_freeze_epochs)]
    if args.sweep:
        settings = sorted(set(settings + [(1e-5, 0), (1e-5, 1), (1e-4, 0), (1e-4, 1)]))
    for gran in ("per-channel", "per-tensor"):
        for q_lr, freeze in (settings if gran == "per-channel" else settings[:1]):
            qat = build_qat_model(model, gran)
            calibrate_ranges(qat, rep)
            qat.compile(keras.optimizers.Adam(q_lr), "sparse_categorical_crossentropy", ["accuracy"])
            train_qat(qat, train_ds(), val_ds(), args.qat_epochs, min(freeze, args.qat_epochs))
            sim = keras_probs(qat, x)
            p = litert_probs(tflite_int8(qat, rep, io, gran), x)
            tag = f"{args.qat_epochs} ep, lr {q_lr:g}, freeze {freeze}"
            rows.append({"model": f"Keras QAT ({tag})", "granularity": gran, "accuracy": acc(sim, y),
                         "agree_float": top1(sim, float_probs), "agree_source": None})
            rows.append({"model": f"int8 QAT ({tag})", "granularity": gran, "accuracy": acc(p, y),
                         "agree_float": top1(p, float_probs), "agree_source": top1(p, sim)})
            print(f"accuracy: QAT {gran} {tag}: Keras {rows[-2]['accuracy']:.4f}, file {rows[-1]['accuracy']:.4f}",
                  flush=True)
    for r in rows:
        r["accuracy_interval"] = list(wilson_interval(round(r["accuracy"] * n), n))

    print(f"\n{n} parity inputs ({int(np.sum(inputs.copy == 0))} validation images + augmented copies), "
          f"run {run}, {io} I/O, {time.time() - t0:.0f} s\n")
    print("| QAT variant (learning rate 0) | QAT Keras vs int8 file, XNNPACK | vs file, reference kernels | "
          "XNNPACK vs reference (same file) |\n|---|---|---|---|")
    for r in fidelity:
        print(f"| {r['variant']} | {r['sim_vs_file_xnnpack']:.1%} | {r['sim_vs_file_reference']:.1%} | "
              f"{r['xnnpack_vs_reference']:.1%} |")
    print("\n| model | weights | accuracy (LiteRT for files) | 95 % interval | agreement with float Keras | "
          "agreement with its source |\n|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["accuracy_interval"]
        src = "-" if r["agree_source"] is None else f"{r['agree_source']:.1%}"
        print(f"| {r['model']} | {r['granularity']} | {r['accuracy']:.4f} | [{lo:.3f}, {hi:.3f}] | "
              f"{r['agree_float']:.1%} | {src} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "n": n, "io": io, "qat_epochs": args.qat_epochs,
                                               "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
                                               "fidelity": fidelity, "accuracy": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
