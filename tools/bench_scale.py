#!/usr/bin/env python
"""Does `edgeft finetune` / `edgeft export` scale with the folder? (issue 11)

    python tools/bench_scale.py                                   # 3,000 / 12,000 / 48,000 images, 224 px
    python tools/bench_scale.py --sizes 200,400 --image-size 64   # plumbing check (minutes)
    python tools/bench_scale.py --json scale.json --keep

Dev-machine script (needs edgeft and, for the bare baseline, TensorFlow). What it does:

1. Synthetic data. For every size N, a folder ROOT/data/nN/ of 320x240 JPEGs in --classes class
   sub-folders (class-dependent colour and stripe orientation/frequency, random shift, brightness
   and Gaussian pixel noise cropped from a fixed noise field: learnable, not trivial), written
   by a process pool (about 1 ms per image per core) into a temporary directory that is renamed
   into place, with ROOT/data/nN.json (its parameters) written after the rename; a folder whose JSON matches is reused, anything else is deleted and written again.
   Image i of class c is the same in every folder (seeded by (seed, c, i)).

2. For every size, two separate processes, exactly as a user runs them:
       python -m edgeft finetune ROOT/data/nN --out ROOT/runs/nN --overwrite --backbone mobilenet_v2
           --alpha 0.35 --weights none --image-size S --batch-size B --head-epochs 1
           --finetune-epochs 1 --qat-epochs 0 --val-split V
       python -m edgeft export ROOT/runs/nN --tflite int8 --max-accuracy-drop 99.9 --floor-slack 99.9
   (stdout/stderr go to ROOT/logs/). Each is timed (wall clock, start to exit) and its peak
   resident memory is measured for the whole process tree: /proc is polled every 0.2 s and the
   VmRSS of the process and all its descendants summed; the result is the larger of that sampled
   sum and the largest single-process peak the kernel reports (VmHWM while running, and
   ru_maxrss from wait4 at exit, which also covers short-lived children the poll missed).
   GB here is 10^9 bytes.

3. Bare baseline (a subprocess of this script, once per image size and batch size): edgeft's own
   model (edgeft.core.config.build_config + edgeft.nn.model.build_model with the same backbone, alpha,
   weights, size and class count), unfrozen as stage 2 unfreezes it (edgeft.nn.model.unfreeze_top
   with the config's --unfreeze default), Adam with stage 2's cosine schedule, and one
   `tf.function` step: forward (training=True) + sparse categorical cross-entropy + gradients +
   apply. It runs on random float32 0-255 batches held in memory (4 distinct batches, cycled),
   warm-up steps first (tracing excluded), then timed for at least --bare-seconds.
   It also times a forward-only `tf.function` (training=False), used to estimate the
   validation pass below.

Stage-2 images/s from the real run: history.csv's `seconds` of a stage 'finetune' epoch is the
wall time from epoch begin to epoch end as Keras reports it. Besides the training steps it
includes the validation pass and, in the first epoch, tracing the train and test functions
(seconds on CPU: at 3,000 images this alone can be several per cent of the epoch; it does not
grow with the folder). Two measures are printed and stored:
  * raw:       n_train * epochs / sum(seconds)
  * corrected: n_train * epochs / (sum(seconds) - epochs * n_val / bare_forward_images_per_s
                                    - bare_train_trace_s - bare_forward_trace_s)
where the trace times are the bare model's first call minus one steady step (Keras traces a bit
more: metrics, its own step wrapper, so the correction errs small). The validation split is
kept small (--val-split, default 0.05, instead of edgeft's 0.2) so the correction is small. The
goal is evaluated on the corrected figure; the raw one is shown beside it. Both are compared
with the bare train step (ratio = stage-2 / bare).

Goals (evaluated from the measurements, smallest vs largest size given; PASS/FAIL printed):
  finetune_rss_growth   finetune peak RSS at the largest size <= 1.3x that at the smallest
  finetune_rss_3gb      finetune peak RSS <= 3 GB at every size
  finetune_time_flat    finetune seconds per image: max / min over all sizes <= 1.2
  stage2_time_flat      stage-2 epoch seconds per image (history.csv): max / min over sizes <= 1.2
                        (the same without the fixed start-up cost the line above divides by N)
  export_rss_flat       export peak RSS largest / smallest size <= 1.3 (calibration reads
                        --rep-samples images and the parity gate --parity-inputs inputs whatever
                        the folder size, so nothing in export should grow with it)
  export_time_flat      export seconds largest / smallest size <= 1.2
  stage2_vs_bare        corrected stage-2 images/s >= 0.9x bare, at every size
With --skip-export the export goals are reported as "skipped". Small sizes (a few hundred
images) are plumbing checks only: fixed costs (TensorFlow import, model build, tracing) dominate.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
WIDTH, HEIGHT = 320, 240
DATA_VERSION = 2
# A model trained for 1 + 1 epochs from random weights can sit near chance, and then its int8
# file fails the parity gate's agreement tier; export then exits 1 and skips what follows the
# gate (golden vectors). Loosening the int8 tier keeps every export doing the same, full work.
EXPORT_ARGS = "--max-accuracy-drop 99.9 --floor-slack 99.9"

GOALS = {   # name -> (description, limit)
    "finetune_rss_growth": ("finetune peak RSS largest/smallest size <= 1.3x", 1.3),
    "finetune_rss_3gb": ("finetune peak RSS <= 3 GB at every size", 3.0),
    "finetune_time_flat": ("finetune s/image max/min over sizes <= 1.2", 1.2),
    "stage2_time_flat": ("stage-2 epoch s/image (history.csv, no start-up cost) max/min over sizes <= 1.2", 1.2),
    "export_rss_flat": ("export peak RSS largest/smallest size <= 1.3x", 1.3),
    "export_time_flat": ("export seconds largest/smallest size <= 1.2x", 1.2),
    "stage2_vs_bare": ("stage-2 images/s (val/trace-corrected) >= 0.9x bare step, every size", 0.9),
}


# ---------------------------------------------------------------- synthetic data
def _class_base(c: int, classes: int) -> np.ndarray:
    """Class c's clean image (HEIGHT, WIDTH, 3) float32: a colour plus stripes whose angle and
    frequency depend on the class, so colour alone does not separate every pair."""
    rng = np.random.default_rng([1234, c])
    colour = rng.uniform(40, 215, 3).astype(np.float32)
    angle = math.pi * c / classes
    freq = 2 * math.pi / (12 + 6 * (c % 4))
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * freq)
    return colour[None, None, :] + 35.0 * stripes[..., None]


_NOISE: dict[int, np.ndarray] = {}


def _noise_bank(seed: int) -> np.ndarray:
    """A (2H, 2W, 3) int16 field of Gaussian noise (sigma 20) per worker; each image takes a
    random crop of it (generating fresh noise per image would cost more than the JPEG encoding)."""
    if seed not in _NOISE:
        rng = np.random.default_rng([seed, 99991])
        _NOISE[seed] = np.round(rng.normal(0, 20, (2 * HEIGHT, 2 * WIDTH, 3))).astype(np.int16)
    return _NOISE[seed]


def _write_chunk(task) -> int:
    """Writes images [start, start+count) of one class (a worker-process task)."""
    from PIL import Image

    folder, c, classes, start, count, seed = task
    base = np.round(_class_base(c, classes)).astype(np.int16)
    noise = _noise_bank(seed)
    d = Path(folder) / f"class_{c:02d}"
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, c, i])
        dy, dx, ny, nx = (int(v) for v in rng.integers(0, [HEIGHT, WIDTH, HEIGHT, WIDTH]))
        img = np.roll(base, (dy, dx), axis=(0, 1))
        img *= int(rng.integers(48, 81))          # brightness 0.75-1.25 (x/64)
        img >>= 6
        img += noise[ny:ny + HEIGHT, nx:nx + WIDTH]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img_{i:06d}.jpg", quality=90)
    return count


def make_folder(root: Path, n: int, classes: int, seed: int, workers: int) -> Path:
    """ROOT/data/nN with n JPEGs (reused when ROOT/data/nN.json matches); atomic by rename."""
    data = root / "data"
    folder, marker = data / f"n{n}", data / f"n{n}.json"
    params = {"n": n, "classes": classes, "seed": seed, "width": WIDTH, "height": HEIGHT,
              "format": "jpeg", "version": DATA_VERSION}
    if folder.is_dir() and marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                print(f"data: reusing {folder}")
                return folder
        except ValueError:
            pass
    data.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".n{n}.", dir=data))
    try:
        per_class = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
        tasks = []
        for c, k in enumerate(per_class):
            (tmp / f"class_{c:02d}").mkdir()
            for s in range(0, k, 250):
                tasks.append((str(tmp), c, classes, s, min(250, k - s), seed))
        t0 = time.perf_counter()
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                written = sum(pool.imap_unordered(_write_chunk, tasks))
        else:
            written = sum(map(_write_chunk, tasks))
        assert written == n, (written, n)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fd, tmp_marker = tempfile.mkstemp(prefix=".marker.", dir=data)
    with os.fdopen(fd, "w") as f:
        json.dump(params, f)
    os.replace(tmp_marker, marker)
    print(f"data: wrote {n} JPEGs ({WIDTH}x{HEIGHT}, {classes} classes) to {folder} "
          f"in {time.perf_counter() - t0:.1f}s")
    return folder


# ---------------------------------------------------------------- measuring a process tree
def _proc_table() -> dict[int, int]:
    """pid -> parent pid for every process we can read."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
                table[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return table


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB, (0, 0) when it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, hwm


class TreeMonitor(threading.Thread):
    """Samples the summed RSS of `pid` and its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_sum_kb = 0
        self.peak_single_kb = 0
        self.max_procs = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            table = _proc_table()
            children: dict[int, list[int]] = {}
            for p, pp in table.items():
                children.setdefault(pp, []).append(p)
            tree, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                tree.append(p)
                todo.extend(children.get(p, []))
            total = 0
            for p in tree:
                rss, hwm = _status_kb(p)
                total += rss
                self.peak_single_kb = max(self.peak_single_kb, hwm)
            self.peak_sum_kb = max(self.peak_sum_kb, total)
            self.max_procs = max(self.max_procs, len(tree))
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


def run_measured(cmd: list[str], log: Path) -> dict:
    """Runs `cmd` (output to `log`), returning exit code, wall seconds and peak tree RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO))
        mon = TreeMonitor(proc.pid)
        mon.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            seconds = time.perf_counter() - t0
            mon.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
    peak_kb = max(mon.peak_sum_kb, mon.peak_single_kb, usage.ru_maxrss)   # ru_maxrss: kB on Linux
    return {"cmd": cmd, "rc": proc.returncode, "seconds": round(seconds, 2),
            "peak_rss_gb": round(peak_kb * 1024 / GB, 3),
            "peak_rss_sampled_sum_gb": round(mon.peak_sum_kb * 1024 / GB, 3),
            "peak_rss_single_gb": round(max(mon.peak_single_kb, usage.ru_maxrss) * 1024 / GB, 3),
            "max_processes": mon.max_procs, "log": str(log)}


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------- the bare baseline (child)
def bare_child(image_size: int, batch: int, classes: int, backbone: str, alpha: float,
               min_seconds: float, warmup: int) -> dict:
    """Images/s of a bare tf.function train step (and a forward step) of edgeft's stage-2 model."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    sys.path.insert(0, str(REPO))
    from edgeft._keras import keras, tf
    from edgeft.core.config import build_config
    from edgeft.nn.model import build_model, set_seed, unfreeze_top

    cfg = build_config({"backbone": backbone, "alpha": alpha, "weights": "none",
                        "image_size": image_size, "batch_size": batch})
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, image_size, classes)
    trained = unfreeze_top(model, cfg.train.unfreeze)
    opt = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(cfg.train.lr_finetune, 10_000))
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    rng = np.random.default_rng(0)
    xs = [tf.constant(rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype(np.float32)) for _ in range(4)]
    ys = [tf.constant(rng.integers(0, classes, batch).astype(np.int32)) for _ in range(4)]
    variables = model.trainable_variables

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    @tf.function
    def forward(x):
        return model(x, training=False)

    def timed(step, args_for):
        t0 = time.perf_counter()
        float(tf.reduce_sum(step(*args_for(0))))    # first call: tracing + one step
        first = time.perf_counter() - t0
        for i in range(1, warmup):
            float(tf.reduce_sum(step(*args_for(i))))
        n, t0 = 0, time.perf_counter()
        while True:
            out = step(*args_for(n))
            n += 1
            if n >= 5 and time.perf_counter() - t0 >= min_seconds:
                float(tf.reduce_sum(out))   # wait for the last step
                break
        seconds = time.perf_counter() - t0
        return {"steps": n, "seconds": round(seconds, 3), "images_per_s": round(n * batch / seconds, 2),
                "first_call_seconds": round(first, 3), "trace_seconds": round(max(0.0, first - seconds / n), 3)}

    train = timed(train_step, lambda i: (xs[i % 4], ys[i % 4]))
    fwd = timed(forward, lambda i: (xs[i % 4],))
    return {"image_size": image_size, "batch_size": batch, "classes": classes, "backbone": backbone,
            "alpha": alpha, "unfreeze": cfg.train.unfreeze, "trainable_backbone_layers": len(trained),
            "trainable_variables": len(variables), "train": train, "forward": fwd,
            "tensorflow": tf.__version__}


def run_bare(args, log_dir: Path) -> dict:
    out = log_dir / f"bare-{args.image_size}px-b{args.batch_size}.json"
    out.unlink(missing_ok=True)
    cmd = [args.python, str(Path(__file__).resolve()), "--bare-child", str(out),
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--classes", str(args.classes), "--bare-seconds", str(args.bare_seconds)]
    res = run_measured(cmd, log_dir / f"bare-{args.image_size}px-b{args.batch_size}.log")
    if res["rc"] != 0 or not out.is_file():
        print(f"bare baseline failed (exit {res['rc']}), see {res['log']}:\n{_tail(Path(res['log']))}")
        return {"error": f"exit {res['rc']}", "process": res}
    bare = json.loads(out.read_text())
    bare["process"] = res
    return bare


# ---------------------------------------------------------------- one size
def read_run(run: Path) -> dict:
    report = json.loads((run / "data_report.json").read_text())
    with open(run / "history.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    ft = [float(r["seconds"]) for r in rows if r["stage"] == "finetune"]
    head = [float(r["seconds"]) for r in rows if r["stage"] == "head"]
    return {"n_train": int(report["n_train"]), "n_val": int(report["n_val"]),
            "n_test": int(report.get("n_test", 0)), "skipped": len(report.get("skipped", [])),
            "finetune_epoch_seconds": ft, "head_epoch_seconds": head}


def bench_size(args, n: int, folder: Path, bare: dict) -> dict:
    run = args.root / "runs" / f"n{n}"
    logs = args.root / "logs"
    ft_cmd = [args.python, "-m", "edgeft", "finetune", str(folder), "--out", str(run), "--overwrite",
              "--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights", "none",
              "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
              "--head-epochs", "1", "--finetune-epochs", "1", "--qat-epochs", "0",
              "--val-split", str(args.val_split)] + args.finetune_args.split()
    print(f"[n={n}] finetune ...", flush=True)
    ft = run_measured(ft_cmd, logs / f"n{n}-finetune.log")
    row: dict = {"size": n, "finetune": ft}
    if ft["rc"] != 0:
        print(f"[n={n}] finetune failed (exit {ft['rc']}), see {ft['log']}:\n{_tail(Path(ft['log']))}")
        return row
    info = read_run(run)
    row.update(info)
    row["finetune_s_per_1000"] = round(ft["seconds"] / n * 1000, 3)
    epochs = len(info["finetune_epoch_seconds"])
    if epochs:
        total = sum(info["finetune_epoch_seconds"])
        row["stage2_images_per_s_raw"] = round(info["n_train"] * epochs / total, 2)
        fwd = (bare.get("forward") or {}).get("images_per_s")
        if fwd:
            # the validation passes, and one tracing of the train and the forward function (the
            # first epoch of the process traces both), estimated from the bare model's
            val_est = epochs * info["n_val"] / fwd
            trace_est = bare["train"]["trace_seconds"] + bare["forward"]["trace_seconds"]
            row["val_seconds_estimate"] = round(val_est, 2)
            row["trace_seconds_estimate"] = round(trace_est, 2)
            if total - val_est - trace_est > 0:
                row["stage2_images_per_s"] = round(info["n_train"] * epochs / (total - val_est - trace_est), 2)
        b = (bare.get("train") or {}).get("images_per_s")
        if b:
            row["bare_images_per_s"] = b
            row["ratio_raw"] = round(row["stage2_images_per_s_raw"] / b, 3)
            if "stage2_images_per_s" in row:
                row["ratio"] = round(row["stage2_images_per_s"] / b, 3)
    print(f"[n={n}] finetune {ft['seconds']:.1f}s, peak RSS {ft['peak_rss_gb']:.2f} GB", flush=True)
    if not args.skip_export:
        print(f"[n={n}] export ...", flush=True)
        ex = run_measured([args.python, "-m", "edgeft", "export", str(run), "--tflite", "int8"]
                          + args.export_args.split(), logs / f"n{n}-export.log")
        row["export"] = ex
        int8 = run / "export" / "model_int8.tflite"
        row["export_int8_bytes"] = int8.stat().st_size if int8.is_file() else None
        if ex["rc"] != 0:
            # 1: the parity gate refused a file; 2: edgeft reported an error. Said plainly, and a goal fails.
            print(f"[n={n}] export exited {ex['rc']}, see {ex['log']}:\n"
                  f"{_tail(Path(ex['log']), 8)}")
        print(f"[n={n}] export {ex['seconds']:.1f}s, peak RSS {ex['peak_rss_gb']:.2f} GB", flush=True)
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return row


# ---------------------------------------------------------------- goals and the table
def _verdict(ok: bool | None) -> str:
    return "skipped" if ok is None else ("PASS" if ok else "FAIL")


def evaluate(rows: list[dict], skip_export: bool) -> dict:
    ok_rows = [r for r in rows if r["finetune"]["rc"] == 0 and "n_train" in r]
    goals = {}
    if len(ok_rows) < len(rows):
        failed = [r["size"] for r in rows if r not in ok_rows]
        goals["all_runs_finished"] = {"description": "every finetune run exited 0", "value": failed,
                                      "limit": [], "result": "FAIL"}
    if not ok_rows:
        return goals
    small, large = ok_rows[0], ok_rows[-1]
    two = len(ok_rows) >= 2

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    def add(name, value, ok):
        desc, limit = GOALS[name]
        goals[name] = {"description": desc, "value": value, "limit": limit,
                       "result": _verdict(ok if value is not None else None),
                       "sizes": [small["size"], large["size"]]}

    v = ratio(large["finetune"]["peak_rss_gb"], small["finetune"]["peak_rss_gb"]) if two else None
    add("finetune_rss_growth", v, v is not None and v <= 1.3)
    worst = max(r["finetune"]["peak_rss_gb"] for r in ok_rows)
    add("finetune_rss_3gb", worst, worst <= 3.0)
    spi = [r["finetune_s_per_1000"] for r in ok_rows]
    v = round(max(spi) / min(spi), 3) if two else None
    add("finetune_time_flat", v, v is not None and v <= 1.2)
    # the same question without the fixed start-up (TensorFlow import, model build, tracing) that
    # a whole-process time per image divides by the folder size
    rates = [r["stage2_images_per_s_raw"] for r in ok_rows if r.get("stage2_images_per_s_raw")]
    v = round(max(rates) / min(rates), 3) if two and len(rates) == len(ok_rows) else None
    add("stage2_time_flat", v, v is not None and v <= 1.2)
    if skip_export:
        for name in ("export_rss_flat", "export_time_flat"):
            add(name, None, None)
    else:
        ex = [r for r in ok_rows if "export" in r]
        es, el = (ex[0], ex[-1]) if len(ex) >= 2 else (None, None)
        v = ratio(el["export"]["peak_rss_gb"], es["export"]["peak_rss_gb"]) if es else None
        add("export_rss_flat", v, v is not None and v <= 1.3)
        v = ratio(el["export"]["seconds"], es["export"]["seconds"]) if es else None
        add("export_time_flat", v, v is not None and v <= 1.2)
        failed = [r["size"] for r in ex if r["export"]["rc"] != 0]
        if failed:
            goals["export_exit_0"] = {"description": "every export exited 0",
                                      "value": failed, "limit": [], "result": "FAIL"}
    ratios = [r.get("ratio") for r in ok_rows]
    v = None if any(x is None for x in ratios) else min(ratios)
    add("stage2_vs_bare", v, v is not None and v >= 0.9)
    return goals


def _f(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def print_table(rows: list[dict], bare: dict) -> None:
    head = ["size", "n_train/val", "finetune s", "s/1000 img", "ft peak GB", "export s", "ex peak GB",
            "st2 img/s", "(raw)", "bare img/s", "ratio", "(raw)"]
    lines = [head]
    for r in rows:
        ex = r.get("export") or {}
        lines.append([str(r["size"]), f"{r.get('n_train', '-')}/{r.get('n_val', '-')}",
                      _f(r["finetune"]["seconds"], ".1f"), _f(r.get("finetune_s_per_1000"), ".1f"),
                      _f(r["finetune"]["peak_rss_gb"]), _f(ex.get("seconds"), ".1f"),
                      _f(ex.get("peak_rss_gb")), _f(r.get("stage2_images_per_s"), ".1f"),
                      _f(r.get("stage2_images_per_s_raw"), ".1f"),
                      _f((bare.get("train") or {}).get("images_per_s"), ".1f"),
                      _f(r.get("ratio"), ".3f"), _f(r.get("ratio_raw"), ".3f")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(line, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="3000,12000,48000", help="images per folder, comma-separated")
    p.add_argument("--image-size", type=int, default=224, help="edgeft --image-size (default 224)")
    p.add_argument("--batch-size", type=int, default=32, help="edgeft --batch-size and the bare step's batch")
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "edgeft-bench-scale",
                   help="data, runs and logs go here (default: /tmp/edgeft-bench-scale)")
    p.add_argument("--json", type=Path, help="write all measurements and goal results here")
    p.add_argument("--keep", action="store_true", help="keep the run directories (ROOT/runs/nN)")
    p.add_argument("--skip-export", action="store_true", help="do not run edgeft export")
    p.add_argument("--classes", type=int, default=10, help="class sub-folders (default 10)")
    p.add_argument("--val-split", type=float, default=0.05,
                   help="edgeft --val-split (default 0.05: a small validation pass inside the epoch time)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing JPEGs")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--bare-seconds", type=float, default=20.0,
                   help="time the bare train step (and forward step) for at least this long")
    p.add_argument("--finetune-args", default="", help="extra flags for edgeft finetune (one string)")
    p.add_argument("--export-args", default=EXPORT_ARGS,
                   help=f"extra flags for edgeft export (one string; default {EXPORT_ARGS!r}: the int8 "
                        "tier never refuses the file, so every export does its full work)")
    p.add_argument("--python", default=sys.executable, help="Python that runs edgeft (default: this one)")
    p.add_argument("--bare-child", type=Path, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 3 * args.classes:
        p.error(f"--sizes must be at least 3 images per class ({3 * args.classes})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.bare_child:
        res = bare_child(args.image_size, args.batch_size, args.classes, "mobilenet_v2", 0.35,
                         args.bare_seconds, warmup=3)
        args.bare_child.write_text(json.dumps(res, indent=2))
        print(json.dumps(res))
        return 0
    env_path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in env_path.split(os.pathsep):   # the children import edgeft from this checkout
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env_path] if env_path else []))
    args.root = args.root.resolve()
    logs = args.root / "logs"
    print(f"bench_scale: sizes {args.sizes}, {args.image_size}px, batch {args.batch_size}, root {args.root}, "
          f"EDGEFT_CACHE={os.environ.get('EDGEFT_CACHE', '(unset)')}")
    folders = {n: make_folder(args.root, n, args.classes, args.seed, args.workers) for n in args.sizes}
    print("bare baseline ...", flush=True)
    bare = run_bare(args, logs)
    if "train" in bare:
        print(f"bare: train step {bare['train']['images_per_s']} img/s, forward {bare['forward']['images_per_s']} img/s "
              f"(peak RSS {bare['process']['peak_rss_gb']:.2f} GB)")
    rows = [bench_size(args, n, folders[n], bare) for n in args.sizes]
    print()
    print_table(rows, bare)
    goals = evaluate(rows, args.skip_export)
    print()
    for name, g in goals.items():
        print(f"{g['result']:7s} {name}: {g['description']}  (measured: {g['value']})")
    if len(args.sizes) < 2:
        print("note: one size only, growth goals need two")
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "platform": platform.platform(),
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "edgeft_cache": os.environ.get("EDGEFT_CACHE"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k != "bare_child"},
        "bare": bare, "sizes": rows, "goals": goals,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{args.json.name}.", dir=args.json.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
        print(f"json: {args.json}")
    return 0 if goals and all(g["result"] != "FAIL" for g in goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
