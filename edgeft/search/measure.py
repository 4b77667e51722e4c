"""Phase 1 of a search: each candidate's target file built from its untrained architecture, and
measured as the trained one will be (size, latency, memory, TensorFlow Lite Micro arena).

Latency, file size and the TFLM arena do not depend on the weights' values, so these numbers hold
before any training (docs/search.md has the measurement; a trained file is measured again in
phase 3). Timing is the device script's own: `edgeft_device.py bench FILE --random` in a process
of its own, whose peak RSS less that of an empty process with the same runtime is the file's RAM.
"""
from __future__ import annotations

import math

import time
from pathlib import Path

import numpy as np

from edgeft import device
from edgeft.core import rundir
from edgeft.core.errors import UserError
from edgeft.search.space import Candidate, Target

SUFFIX = {"litert": ".tflite", "tflm": ".tflite", "onnxruntime": ".onnx"}
CALIBRATION_IMAGES = 16   # ranges for an untrained int8 file: a few real images suffice (latency and size only)


def file_bytes(model, target: Target, rep_images: np.ndarray, cfg, labels: list[str] | None = None) -> bytes:
    """`model` as the target's file, converted by the target format's own builder as edgeft export
    converts it (without metadata; int8 by post-training quantization)."""
    from edgeft.core.formats import FORMATS
    from edgeft.export.builders import BUILDERS, BareContext

    fmt = next(f for f in FORMATS if f.family == target.family and f.flag == target.flag)
    return BUILDERS[fmt.name].make(BareContext(model, cfg, rep_images, list(labels or [])), fmt)


def untrained_file(cand: Candidate, target: Target, num_classes: int, rep_images: np.ndarray, cfg) -> tuple[bytes, int]:
    """(the target file of `cand`'s architecture with fresh random weights, its parameter count)."""
    from dataclasses import replace

    from edgeft._keras import keras
    from edgeft.nn.model import build_model

    model_cfg = replace(cfg.model, backbone=cand.backbone, alpha=cand.alpha, weights="none")
    keras.backend.clear_session()
    model = build_model(model_cfg, cand.size, num_classes)
    recalibrate_batchnorm(model, rep_images)
    try:
        return file_bytes(model, target, rep_images, cfg), int(model.count_params())
    finally:
        del model
        keras.backend.clear_session()


def recalibrate_batchnorm(model, images: np.ndarray) -> None:
    """Every BatchNormalization's moving mean and variance set to its batch statistics on `images`.

    A freshly initialised network (moving mean 0, variance 1) lets activations die or saturate
    deep down, so some int8 ranges come out degenerate: TensorFlow Lite Micro then aborted
    (SIGABRT, measured on MobileNetV2 alpha 0.35 at 32 px) on a file LiteRT ran. With statistics
    from real images every layer sees normalised inputs, as in a trained network; the file's
    operators, shapes and size are the same either way."""
    from edgeft._keras import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in bns]
    try:
        for layer in bns:
            layer.momentum = 0.0
        model(np.asarray(images, np.float32), training=True)
    finally:
        for layer, m in zip(bns, saved):
            layer.momentum = m


_BASELINES: dict[str, float | None] = {}


def rss_baseline(suffix: str) -> float | None:
    """Peak RSS (MB) of the device script's process with the runtime loaded and no model (once)."""
    if suffix not in _BASELINES:
        _BASELINES[suffix] = device.child_json(["rss-baseline", suffix], f"{suffix} runtime").get("peak_rss_mb")
    return _BASELINES[suffix]


def time_file(path: Path, threads: int, runs: int, warmup: int) -> dict:
    """The device script's bench of `path` on random inputs in a process of its own."""
    report = device.child_json(["bench", str(path), "--random", "--threads", str(threads), "--runs", str(runs),
                                "--warmup-runs", str(warmup), "--allow-unverified"], path.name)
    if "error" in report:
        raise UserError(f"timing {path.name} failed: {report['error']}")
    base = rss_baseline(path.suffix.lower())
    peak = report.get("peak_rss_mb")
    m = report["machine"]
    return {"latency_ms": device.invoke_latency(report["results"][0]), "peak_rss_mb": peak,
            "ram_mb": None if peak is None or base is None else max(0.0, peak - base),
            "latency_source": f"host: {m.get('platform')} ({m.get('cpu_count')} CPUs), {report['runtime']} "
                              f"{report['runtime_version']}", "machine": m, "runtime": report["runtime"],
            "runtime_version": report["runtime_version"], "threads": threads, "runs": runs}


def tflm_numbers(path: Path) -> dict:
    """TFLite Micro's arena (the smallest that loads and runs, bisected) and flash (the flatbuffer)."""
    from edgeft.export.tflm import flatbuffer_bytes, probe

    info = probe(path)
    return {"arena_bytes": info["arena_bytes"], "flash_bytes": len(flatbuffer_bytes(Path(path).read_bytes()))}


def measure(path: Path, target: Target, threads: int, runs: int, warmup: int, want_arena: bool,
            host_timing: bool = True) -> dict:
    """Everything a limit may judge, measured on the file at `path`."""
    t0 = time.perf_counter()
    out = {"file": str(path), "size_bytes": path.stat().st_size, "sha256": device.file_sha256(path)}
    if host_timing and target.host_latency:
        out |= time_file(path, threads, runs, warmup)
    elif not target.host_latency:
        out |= {"latency_ms": None, "latency_source": "none: TFLite Micro runs on the device (--plan, "
                "then --latency-from)", "ram_mb": None}
    if want_arena:
        out |= tflm_numbers(path)
    out["measure_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def from_device(bench: dict, sha256: str) -> dict | None:
    """A candidate's numbers from a `bench FOLDER --json` report (checked by read_bench_json),
    matched by the file's sha256."""
    for rep in bench.get("files", []):
        if rep.get("sha256") == sha256 and "error" not in rep:
            m = rep["machine"]
            return {"latency_ms": device.invoke_latency(rep["results"][0]), "peak_rss_mb": rep.get("peak_rss_mb"),
                    "ram_mb": rep.get("ram_mb"), "runtime": rep.get("runtime"),
                    "runtime_version": rep.get("runtime_version"), "machine": m, "threads": rep["results"][0]["threads"],
                    "latency_source": f"device: {m.get('platform')} ({m.get('cpu_count')} CPUs), "
                                      f"{rep.get('runtime')} {rep.get('runtime_version')}"}
    return None


def read_bench_json(path: str | Path) -> dict:
    """A device script's `bench FOLDER --json` file (UserError otherwise)."""
    try:
        bench = rundir.read_json(Path(path), None)
    except Exception:
        bench = None
    if not isinstance(bench, dict) or bench.get("format") != "edgeft-bench-folder" or not isinstance(bench.get("files"), list):
        raise UserError(f"--latency-from {path}: not the JSON of `edgeft_device.py bench FOLDER --json` "
                        f"(missing, unreadable, or another kind of file)")
    if not bench["files"]:
        raise UserError(f"--latency-from {path}: it times no file (\"files\" is empty)")
    for i, rep in enumerate(bench["files"]):
        problem = _bench_entry_problem(rep)
        if problem:
            where = rep.get("file", f"entry {i}") if isinstance(rep, dict) else f"entry {i}"
            raise UserError(f"--latency-from {path}: {str(where)[:120]}: {problem}; time the files again with "
                            f"`edgeft_device.py bench FOLDER --json`")
    return bench


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _bench_entry_problem(rep) -> str | None:
    """What is wrong with one file's entry of a device bench JSON (None: usable). Every number the
    search judges must be finite and positive: a null, NaN or negative latency would pass any limit."""
    if not isinstance(rep, dict):
        return f"an entry is {type(rep).__name__}, not an object"
    if "error" in rep:
        return None   # the device could not run it: that candidate then has no time, said per candidate
    if not isinstance(rep.get("sha256"), str) or len(rep["sha256"]) != 64:
        return "no sha256 of the file"
    m = rep.get("machine")
    if not isinstance(m, dict) or not m.get("platform"):
        return "no \"machine\" record (where it was timed)"
    results = rep.get("results")
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        return "no \"results\""
    lat = device.invoke_latency(results[0])
    if not isinstance(lat, dict):
        return "no invoke_ms (nor latency_ms, its name before)"
    for stat in ("p50", "p95"):
        if not _positive(lat.get(stat)):
            return f"latency {stat} is {lat.get(stat)!r:.40}, not a positive number"
    for key in ("ram_mb", "peak_rss_mb"):
        if rep.get(key) is not None and not (_positive(rep[key]) or rep[key] == 0):
            return f"{key} is {rep[key]!r:.40}, not a number of 0 or more"
    return None
