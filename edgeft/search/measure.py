"""Phase 1 of a search: each candidate's target file built from its untrained architecture, and
measured as the trained one will be (size, latency, memory, TensorFlow Lite Micro arena).

Latency and the TFLM arena do not depend on the weights' values, so these numbers hold before
any training (docs/search.md has the measurement; a trained file is measured again in phase 3).
The file's size does, a little: the converter stores two equal constants once and leaves a bias
of zeros out. So the candidate is built as its run starts (its pretrained weights, a head whose
biases are not all zeros), converted by export's own path with export's metadata, and its size
is judged again on the trained file (docs/search.md, "Phase 1"). Timing is the device script's
own: `edgeft_device.py bench FILE --random` in a process of its own, whose peak RSS less that of
an empty process with the same runtime is the file's RAM.
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


def file_bytes(model, target: Target, rep_images: np.ndarray, cfg, labels: list[str]) -> bytes:
    """`model` as the target's file, made by the target format's own builder as edgeft export makes
    it, with the metadata export writes (labels, input contract, name and version): the file that
    ships, its int8 file by post-training quantization (a search trains no QAT)."""
    from edgeft.core.formats import FORMATS
    from edgeft.export.builders import BUILDERS, BareContext

    fmt = next(f for f in FORMATS if f.family == target.family and f.flag == target.flag)
    ctx = BareContext(model, cfg, rep_images, list(labels), metadata=True)
    return BUILDERS[fmt.name].make(ctx, fmt)


def untrained_file(cand: Candidate, target: Target, labels: list[str], rep_images: np.ndarray, cfg,
                   for_tflm: bool = False) -> tuple[bytes, int]:
    """(the target file of `cand`'s architecture as its run starts, its parameter count): the
    backbone with the weights training starts from (`cfg.model.weights`), a fresh head. `for_tflm`:
    TensorFlow Lite Micro will run the file (its arena is measured), so a fresh backbone's
    BatchNorm statistics are set from `rep_images` first (`recalibrate_batchnorm`)."""
    from dataclasses import replace

    from edgeft._keras import keras
    from edgeft.nn.model import build_model

    # --head auto: stage 1 may choose Flatten (never smaller than GAP: features x classes weights
    # against channels x classes), so a budget is judged on the larger head; the trained file is judged again
    model_cfg = replace(cfg.model, backbone=cand.backbone, alpha=cand.alpha,
                        head="flatten" if cfg.model.head == "auto" else cfg.model.head)
    keras.backend.clear_session()
    model = build_model(model_cfg, cand.size, len(labels))
    if model_cfg.weights == "none" and for_tflm:   # else as training leaves a frozen fresh backbone: untouched
        recalibrate_batchnorm(model, rep_images)
    fill_zero_biases(model, cfg.train.seed)
    try:
        return file_bytes(model, target, rep_images, cfg, labels), int(model.count_params())
    finally:
        del model
        keras.backend.clear_session()


def fill_zero_biases(model, seed: int) -> None:
    """Every bias that is all zeros (a fresh head's) set to small random values, as training leaves
    it: the converter leaves a bias of zeros out of the file, which would make the untrained file
    smaller than the trained one by that bias and its quantization parameters."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        bias = getattr(layer, "bias", None)
        if bias is not None and not np.any(bias.numpy()):
            bias.assign(rng.normal(0.0, 0.01, bias.shape).astype(bias.dtype.as_numpy_dtype))


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
