"""`edgeft benchmark RUN`: every exported file and the Keras model, side by side in one process.

Per format: file size, latency at each thread count (batch 1, timed by the device script's
`time_runner`: `invoke_ms`, the runtime call alone, and `end_to_end_ms`, quantize + invoke +
dequantize), accuracy, and ratios to float TFLite. A format whose accuracy falls more than `max_drop` below Keras is flagged.
Measured in one process, one format after another, so ratios are comparable on a noisy machine.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import numpy as np

from edgeft.core import rundir
from edgeft.data.images import list_folder, load_image
from edgeft import device
from edgeft.device import TIMED_RUNS, WARMUP_RUNS
from edgeft.nn.runtime import KerasRunner, read_labels
from edgeft.run import Run, as_run

log = logging.getLogger(__name__)


def timing(runner, pool: list[np.ndarray], runs: int, warmup: int) -> dict:
    """The device script's timing of one runner (`device.time_runner`: invoke_ms and end_to_end_ms,
    batch 1, slow outliers dropped by its rule), so both report the same statistics by the same names."""
    return device.time_runner(runner, pool, runs, warmup) | {"runs": runs}


def accuracy(runner, x: np.ndarray, y: np.ndarray) -> float:
    probs = np.concatenate([runner.predict(x[i:i + 32]) for i in range(0, len(x), 32)])
    return float(np.mean(probs.argmax(-1) == y))


def load_eval_set(run: Run, data: str | None, size: int, limit: int | None):
    """(x, y, source): the --data folder mapped to the run's labels, else the run's headline split: its
    test split, or (a run without one) its validation split, labelled "val (tuned on)"."""
    if data:
        labels = read_labels(run.model_path)
        files = list_folder(data, classes=labels).files
        files = [files[i] for i in _sample(len(files), limit)]
        x = np.stack([load_image(p, size) for p, _ in files]).astype(np.float32)
        return x, np.asarray([lab for _, lab in files]), str(data)
    s = run.splits
    images, source = (s.test, "test") if s.test is not None and len(s.test.y) else (s.val, "val (tuned on)")
    idx = np.sort(_sample(len(images.y), limit))
    return images.read(idx).astype(np.float32), images.y[idx], source


def _sample(n: int, limit: int | None) -> np.ndarray:
    """All indices, or a seeded random `limit` of them (files are listed class by class)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).permutation(n)[:limit])


def benchmark(run: Run | str | Path, data: str | None = None, threads: tuple[int, ...] = (1, 2),
              runs: int = TIMED_RUNS, warmup: int = WARMUP_RUNS, limit: int | None = None,
              max_drop: float = 0.02) -> dict:
    """`max_drop`: a fraction (0.02: 2 points; the CLI's --max-accuracy-drop is in points)."""
    from edgeft.core.lock import run_lock

    handle = as_run(run)
    rundir.check_writable(handle.path, "benchmark: the run directory")   # before minutes of timing
    with run_lock(handle.path, "benchmark"):   # it writes RUN/benchmark.json and benchmark.md
        return _benchmark(handle, data, threads, runs, warmup, limit, max_drop)


def _benchmark(handle: Run, data, threads, runs, warmup, limit, max_drop) -> dict:
    from edgeft.core.formats import EXPORT_DIR, FORMATS, TFLM_DIR
    from edgeft.verify.runners import open_format_runner

    run = handle.path
    files = [("keras", handle.model_path, None)] + [
        (f.name, run / EXPORT_DIR / f.filename, f) for f in FORMATS if (run / EXPORT_DIR / f.filename).is_file()
        and (f.family != "tflm" or (run / EXPORT_DIR / TFLM_DIR).is_dir())]
    keras_runner = KerasRunner(handle.model_path, model=handle.model)
    size = keras_runner.input_hw[0]
    x, y, source = load_eval_set(handle, data, size, limit)
    pool = list(x[:device.LATENCY_POOL])   # cycled through, as the device script does
    rows = []
    for name, path, fmt in files:
        row = {"format": name, "file": path.name, "size_bytes": path.stat().st_size,
               **{timed: {} for timed in device.TIMED}, "outliers_removed": {}}
        # Keras runs on TensorFlow's own thread pool, fixed once TF starts: one measurement
        for t in ((None,) if name == "keras" else threads):
            runner = keras_runner if fmt is None else open_format_runner(fmt, path, t)
            key = "tf_default" if t is None else str(t)
            measured = timing(runner, pool, runs, warmup)
            for timed in device.TIMED:
                row[timed][key] = measured[timed]
            row["outliers_removed"][key] = measured["outliers_removed"]
        row["accuracy"] = accuracy(runner, x, y)
        rows.append(row)
        log.info(f"benchmark: {name:<15} {row['size_bytes'] / 1e6:7.2f} MB  accuracy {row['accuracy']:.4f} "
                 f"({source} n={len(y)})")
    _add_ratios(rows, max_drop)
    result = {"run": str(run), "data": source, "n_images": int(len(y)), "threads": list(threads), "runs": runs,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "max_drop": max_drop, "latency_rule": device.LATENCY_RULE,
              "rows": rows}
    rundir.write_json(run / rundir.BENCHMARK_JSON, result)
    rundir.write_text(run / rundir.BENCHMARK_MD, benchmark_markdown(result))
    log.info(benchmark_markdown(result))
    return result


def _add_ratios(rows: list[dict], max_drop: float) -> None:
    keras_acc = rows[0]["accuracy"]
    base = next((r for r in rows if r["format"] == "tflite_float"), None)
    for r in rows:
        r["flagged"] = r["accuracy"] < keras_acc - max_drop - 1e-9
        if base is None:
            continue
        r["size_ratio_vs_tflite_float"] = r["size_bytes"] / base["size_bytes"]
        r["invoke_p50_ratio_vs_tflite_float"] = {t: v["p50"] / base["invoke_ms"][t]["p50"]
                                                 for t, v in r["invoke_ms"].items() if t in base["invoke_ms"]}


def benchmark_markdown(result: dict) -> str:
    ths = [str(t) for t in result["threads"]]
    head = ("| format | size (MB) | size × | "
            + " | ".join(f"invoke p50 ms @{t}t | × | end-to-end p50 ms @{t}t" for t in ths)
            + f" | accuracy ({result['data']} n={result['n_images']}) | flag |")
    lines = [f"# Benchmark: {result['run']}", "",
             f"{result['n_images']} images ({result['data']}), batch 1, {result['runs']} runs per setting, "
             f"{result['machine']['platform']}, {result['date']}. invoke = the runtime call alone "
             f"(`invoke_ms`), end-to-end = pixels to probabilities: quantize + invoke + dequantize "
             f"(`end_to_end_ms`), both timed as edgeft_device.py bench times them. × = invoke ratio to "
             f"float TFLite.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        inv, e2e = r["invoke_ms"], r["end_to_end_ms"]
        cells = []
        for t in ths:
            key = t if t in inv else "tf_default"
            tf = "" if t in inv else " (tf)"
            ratio = r.get("invoke_p50_ratio_vs_tflite_float", {}).get(t)
            cells.append(f"{inv[key]['p50']:.3f}{tf} | {'' if ratio is None else f'{ratio:.2f}'} | "
                         f"{e2e[key]['p50']:.3f}{tf}")
        size_ratio = r.get("size_ratio_vs_tflite_float")
        lines.append(f"| {r['format']} | {r['size_bytes'] / 1e6:.3f} | {'' if size_ratio is None else f'{size_ratio:.2f}'} | "
                     + " | ".join(cells) + f" | {r['accuracy']:.4f} | {'BELOW FLOOR' if r['flagged'] else ''} |")
    return "\n".join(lines) + "\n"
