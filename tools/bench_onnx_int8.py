#!/usr/bin/env python3
"""Float ONNX against each int8 variant edgeft can write, under ONNX Runtime, side by side.

A dev-machine benchmark (needs TensorFlow and edgeft): builds MobileNetV2 (random weights, the
BatchNorm statistics set from the calibration images so activations have realistic ranges),
exports the float file and every variant in edgeft.export.keras2onnx.INT8_VARIANTS through
edgeft.export.keras2onnx, then times them all in this one process. The timing is interleaved (each
round runs a short burst of every model, in a shuffled order), so a busy, shared machine slows
every model alike and the ratios stay meaningful; latency is the median of the per-run samples.
Optionally checks which files OpenCV's DNN module loads and whether its top-1 matches ORT's.
"agree" is top-1 agreement with the float file on 8 synthetic images: with random weights the
outputs are nearly uniform, so it is a sanity check only; parity is tested on a trained model
(tests/test_onnx_export.py). Report ratios from quiet runs: "cpu ms" (the calling thread's CPU
time) is less hurt by other processes than wall time, but cache sharing still slows both.

    python tools/bench_onnx_int8.py                          # MobileNetV2 1.0, 224 px, 1 thread
    python tools/bench_onnx_int8.py --json out.json --opencv
    python tools/bench_onnx_int8.py --alpha 0.35 --image-size 96 --variants qdq_u8s8_pc qdq_s8s8_pc
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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"})
    except OSError:
        pass
    return []


def build(alpha: float, size: int, classes: int, calib: np.ndarray):
    """The edgeft model (Preprocess + MobileNetV2, random weights) with data-set BatchNorm stats."""
    from edgeft._keras import keras
    from edgeft.core.config import ModelConfig
    from edgeft.nn.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(backbone="mobilenet_v2", weights="none", alpha=alpha), size, classes)
    normalise_batchnorm(model, calib)
    return model


def normalise_batchnorm(model, images: np.ndarray) -> None:
    """Sets each BatchNorm's moving mean/variance to its input's statistics on `images`, in
    order: an untrained MobileNetV2 otherwise shrinks activations towards 0 layer by layer
    (outputs ~1e-12 at the top), which would make int8 calibration meaningless."""
    from edgeft._keras import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.input, [bn.input for bn in bns])
    for i, bn in enumerate(bns):
        # one pass per layer: the stats of layer i depend on the layers set before it
        a = np.asarray(probe.predict_on_batch(images)[i])
        gamma, beta, _, _ = bn.get_weights()
        bn.set_weights([gamma, beta, a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2)) + 1e-3])


def structured_images(n: int, size: int, seed: int) -> np.ndarray:
    from edgeft.export.keras2onnx import synthetic_images

    return synthetic_images(n, size, seed=seed)


def session(model: bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def interleaved_latency(sessions: dict, x: np.ndarray, rounds: int, burst: int, warmup: int,
                        seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{name: {"wall": ms per run, "cpu": this thread's CPU ms per run}}. Every round runs `burst`
    inferences of each model, the models in a fresh random order, so load changes on the machine
    hit every model alike. With 1 intra-op thread ORT computes on the calling thread, so its CPU
    time leaves out the time the scheduler gave to other processes (wall time does not; on a
    shared machine that penalises the longer model more, as it is preempted more often)."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    wall = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}
    order = list(sessions)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            s, feed = sessions[k], feeds[k]
            for _ in range(burst):
                c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
                s.run(None, feed)
                t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
                wall[k].append((t1 - t0) / 1e6)
                cpu[k].append((c1 - c0) / 1e6)
    return {k: {"wall": np.asarray(wall[k]), "cpu": np.asarray(cpu[k])} for k in sessions}


def opencv_check(path: Path, x: np.ndarray, ort_probs: np.ndarray) -> dict:
    """Whether cv2.dnn loads the file and runs the NHWC input as given; top-1 vs ORT."""
    try:
        import cv2
    except ImportError:
        return {"loads": None, "error": "opencv not installed"}
    try:
        net = cv2.dnn.readNetFromONNX(str(path))
    except cv2.error as e:
        return {"loads": False, "error": _cv_message(e)}
    try:
        out = []
        for img in x:   # batch 1, the NHWC float32 array as is
            net.setInput(img[None].astype(np.float32))
            out.append(np.asarray(net.forward()).reshape(-1))
        probs = np.stack(out)
    except cv2.error as e:
        return {"loads": True, "runs": False, "error": _cv_message(e)}
    return {"loads": True, "runs": True,
            "top1_agreement_with_ort": float(np.mean(probs.argmax(-1) == ort_probs.argmax(-1))),
            "max_abs_diff_vs_ort": float(np.max(np.abs(probs - ort_probs)))}


def _cv_message(e: Exception) -> str:
    text = " ".join(str(e).split())   # "OpenCV(5.0.0) /path/file.cpp:12: error: (-215:Assertion failed) ..."
    return (text.split(" error: ", 1)[-1] or type(e).__name__)[:200]


def parse_args(argv):
    from edgeft.export.keras2onnx import INT8_VARIANTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--calib", type=int, default=50, help="calibration images (default: 50)")
    p.add_argument("--variants", nargs="+", default=list(INT8_VARIANTS), choices=list(INT8_VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=25, help="interleaved rounds (default: 25)")
    p.add_argument("--burst", type=int, default=4, help="runs per model per round (default: 4)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--opencv", action="store_true", help="also try each file in cv2.dnn")
    p.add_argument("--keep", metavar="DIR", help="also write the .onnx files here")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    from edgeft.export import keras2onnx as ox

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    calib = structured_images(args.calib, args.image_size, seed=1)
    test = structured_images(8, args.image_size, seed=2)
    model = build(args.alpha, args.image_size, args.classes, calib[:16])
    meta = ox.labels_metadata([f"class_{i}" for i in range(args.classes)])
    files = {"float": ox.onnx_float_bytes(model, args.image_size, args.opset, meta, check_images=test[:4])}
    keras_probs = np.asarray(model.predict_on_batch(test), np.float32)
    build_s = {"float": round(time.perf_counter() - t0, 1)}
    for name in args.variants:
        t1 = time.perf_counter()
        files[name] = ox.onnx_int8_bytes(files["float"], calib, {}, variant=name)
        build_s[name] = round(time.perf_counter() - t1, 1)
        print(f"built {name} in {build_s[name]} s", flush=True)
    sessions = {k: session(v, args.threads) for k, v in files.items()}
    probs = {k: s.run(None, {s.get_inputs()[0].name: test})[0] for k, s in sessions.items()}
    samples = interleaved_latency(sessions, test[:1], args.rounds, args.burst, args.warmup)
    float_ms = {kind: float(np.median(samples["float"][kind])) for kind in ("wall", "cpu")}
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-int8-")
    keep = Path(args.keep or tmp.name)
    keep.mkdir(parents=True, exist_ok=True)
    for k, data in files.items():
        path = keep / (f"{k}.onnx")
        path.write_bytes(data)
        wall, cpu = samples[k]["wall"], samples[k]["cpu"]
        row = {"variant": k, "describe": "float32" if k == "float" else ox.INT8_VARIANTS[k].describe(),
               "size_mb": round(len(data) / 1e6, 3), "runs": int(len(wall)),
               "median_ms": round(float(np.median(wall)), 3),
               "p10_ms": round(float(np.percentile(wall, 10)), 3),
               "p90_ms": round(float(np.percentile(wall, 90)), 3),
               "median_cpu_ms": round(float(np.median(cpu)), 3),
               "speedup_vs_float": round(float_ms["wall"] / float(np.median(wall)), 2),
               "cpu_speedup_vs_float": round(float_ms["cpu"] / float(np.median(cpu)), 2),
               "top1_agreement_vs_float": float(np.mean(probs[k].argmax(-1) == probs["float"].argmax(-1))),
               "max_abs_diff_vs_float": float(np.max(np.abs(probs[k] - probs["float"]))),
               "build_s": build_s[k], "dynamic_batch": ox.batch_dims(data)}
        if args.opencv:
            row["opencv"] = opencv_check(path, test, probs[k])
        rows.append(row)
    tmp.cleanup()
    result = {
        "model": f"MobileNetV2 alpha {args.alpha}, {args.image_size} px, {args.classes} classes, random weights "
                 "(BatchNorm stats from the calibration images)",
        "calibration_images": args.calib, "threads": args.threads,
        "timing": f"interleaved: {args.rounds} rounds x {args.burst} runs per model, shuffled order, "
                  f"{args.warmup} warm-up runs each; median per run, batch 1; wall time and the "
                  "calling thread's CPU time (ORT computes on it at 1 thread)",
        "float_keras_vs_onnx_max_abs_diff": float(np.max(np.abs(probs["float"] - keras_probs))),
        "default_int8": ox.DEFAULT_INT8,
        "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "numpy": np.__version__,
                    "load_avg_before": [round(v, 2) for v in load_before],
                    "load_avg_after": [round(v, 2) for v in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    if args.opencv:
        import cv2
        result["machine"]["opencv"] = cv2.__version__
    print(f"\n{result['model']}; ORT {ort.__version__}, {args.threads} thread(s), {cpu_model()}")
    print(f"{'variant':<22}{'MB':>6}{'wall ms':>9}{'p10':>7}{'p90':>7}{'x float':>8}"
          f"{'cpu ms':>8}{'x float':>8}{'agree':>7}"
          + ("  opencv" if args.opencv else ""))
    for r in rows:
        cv = ""
        if args.opencv:
            c = r["opencv"]
            cv = ("  loads, top-1 = ORT on " + f"{c['top1_agreement_with_ort']:.0%}" if c.get("runs")
                   else f"  FAILS: {c.get('error', '')[:90]}")
        print(f"{r['variant']:<22}{r['size_mb']:>6.2f}{r['median_ms']:>9.2f}{r['p10_ms']:>7.2f}{r['p90_ms']:>7.2f}"
              f"{r['speedup_vs_float']:>8.2f}{r['median_cpu_ms']:>8.2f}{r['cpu_speedup_vs_float']:>8.2f}"
              f"{r['top1_agreement_vs_float']:>7.0%}{cv}")
    if args.json:
        out = Path(args.json)
        part = out.with_name(out.name + ".tmp")
        part.write_text(json.dumps(result, indent=2) + "\n")
        part.replace(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
