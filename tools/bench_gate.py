"""Does the parity gate pass healthy files and fail broken ones? A confusion table.

Healthy runs (each trained here, offline, on scikit-learn's digits with the shipped demo backbone):
  suite     digits 5-7, 24 images a class, 32 px, the test suite's tiny recipe (seeds 1, 2, 3)
  digits10  all 10 digits, 40 training images a class, 64 px, no augmentation, the demo's schedule
            (15 head + 8 fine-tune epochs at 1e-3, half the backbone unfrozen); the setting issue 16
            measured, on the shipped 32 px backbone (no 64 px one is shipped)
  colour    3 classes told apart by ink colour alone (red / green / blue), 32 px
  demo      `edgeft finetune` with no folder (digits 5-9, the demo's own settings)
Each gets 2 QAT epochs (1 for suite); its healthy files: PTQ and QAT int8 TFLite (per-channel),
PTQ int8 TFLite per-tensor, PTQ int8 ONNX, each judged by the gate's decision (edgeft.core.tiers.judge
against its source model, floor measured on the file); then one default `edgeft export` of the
run, whose exit status and shipped int8 files are recorded.

Broken files, each made the way such bugs happen, judged against the run's float model:
  normalization   the model wrapped to divide its input by 255 first (a 0-1 pipeline), PTQ int8
  blank-calib     PTQ int8 calibrated on blank (all-zero) images only
  other-run       another seed's PTQ int8 file (same recipe, same data): same accuracy, another model
  input-scale-2x  the int8 file's input scale doubled in the flatbuffer
  swapped-rgb     (colour run) the model fed BGR, PTQ int8
  truncated       the int8 file cut in half
  hand-edited     the largest weight buffer of the int8 file overwritten with random bytes

    python tools/bench_gate.py                    # everything (~30-60 min on 2 cores)
    python tools/bench_gate.py --quick            # suite seeds 1-2 + colour, no demo / digits10
    python tools/bench_gate.py --json out.json

Prints the confusion table (healthy pass / fail, broken pass / fail) and per-file numbers: the
drop against the source model in points with its interval, top-1 agreement on clear inputs at
several clear margins, and the floor. Exit 1 when a healthy file fails or a broken file passes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("EDGEFT_QUIET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

MARGINS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4)
SUITE = dict(backbone="mobilenet_v2", alpha=0.35, image_size=32, head="gap", dense=32, dropout=0.2, head_epochs=12,
             lr_head=3e-3, finetune_epochs=2, lr_finetune=1e-4, unfreeze="block_16", batch_size=16, patience=0,
             steps_per_execution=1)
DIGITS10 = dict(backbone="mobilenet_v2", alpha=0.35, image_size=64, head_epochs=15, finetune_epochs=8, lr_head=3e-3,
                lr_finetune=1e-3, unfreeze="0.5", patience=3, batch_size=32, test_split=0.0, val_split=0.15)


def write_folder(root: Path, x, y, names) -> Path:
    for c, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(np.flatnonzero(y == c)):
            Image.fromarray(x[idx]).save(d / f"{i:04d}.png")
    return root


def suite_folder(root: Path) -> Path:
    from edgeft.data.demo import digit_images

    x, y = digit_images([5, 6, 7], size=32, seed=0)
    keep = np.concatenate([np.flatnonzero(y == d)[:24] for d in (5, 6, 7)])
    return write_folder(root, x[keep], y[keep] - 5, ["five", "six", "seven"])


def digits10_folder(root: Path) -> Path:
    from edgeft.data.demo import digit_images

    x, y = digit_images(range(10), size=64, seed=3)
    keep = np.concatenate([np.flatnonzero(y == d)[:47] for d in range(10)])   # 40 train + 7 validation
    return write_folder(root, x[keep], y[keep], [f"d{d}" for d in range(10)])


def colour_folder(root: Path, per_class: int = 30) -> Path:
    """Classes told apart by ink colour alone: the digit drawn is random."""
    from edgeft.data.demo import digit_images

    x, _ = digit_images(range(10), size=32, seed=5)
    grey = x.astype(np.float32).mean(-1, keepdims=True) / 255.0
    rng = np.random.default_rng(0)
    inks = np.array([[230, 40, 40], [40, 200, 40], [40, 60, 230]], np.float32)
    xs, ys = [], []
    for c in range(3):
        for i in rng.choice(len(x), per_class, replace=False):
            paper = rng.uniform(20, 70, 3)
            ink = np.clip(inks[c] + rng.normal(0, 15, 3), 0, 255)
            img = paper + grey[i] * (ink - paper) + rng.normal(0, 5, grey[i].shape)
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
    return write_folder(root, np.stack(xs), np.array(ys), ["red", "green", "blue"])


# ---------------------------------------------------------------- broken files
def wrapped(model, fn):
    """The model behind an input transformation (a bug in the pipeline before it)."""
    from edgeft._keras import keras

    inp = keras.Input(model.input_shape[1:])
    return keras.Model(inp, model(keras.layers.Lambda(fn)(inp)))


def int8_bytes(model, rep, blank: bool = False) -> bytes:
    from edgeft.export.keras2tflite import tflite_int8

    if not blank:
        return tflite_int8(model, rep)
    from edgeft._keras import tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([np.zeros((1,) + rep.shape[1:], np.float32)] for _ in range(20))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    return conv.convert()


def scaled_input(data: bytes, factor: float) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.convert_bytearray_to_object(bytearray(data))
    sg = m.subgraphs[0]
    q = sg.tensors[sg.inputs[0]].quantization
    q.scale = [s * factor for s in q.scale]
    return bytes(fu.convert_object_to_bytearray(m))


def hand_edited(data: bytes) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils as fu

    m = fu.convert_bytearray_to_object(bytearray(data))
    big = max(range(len(m.buffers)), key=lambda i: 0 if m.buffers[i].data is None else len(m.buffers[i].data))
    buf = m.buffers[big]
    buf.data = np.random.default_rng(0).integers(0, 256, len(buf.data)).astype(np.uint8)
    return bytes(fu.convert_object_to_bytearray(m))


# ---------------------------------------------------------------- judging one file
def judge_file(name, data: bytes, suffix: str, inputs, source_probs, cfg, kind: str, source: str) -> dict:
    from edgeft.core.floor import input_contract_failures, measure_floor
    from edgeft.nn.runtime import open_runner
    from edgeft.core.tiers import clear_mask, describe, judge

    p, seed = cfg.parity, cfg.train.seed
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model{suffix}"
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            probs = open_runner(path).predict(inputs.x)
            floor = measure_floor(path, inputs.x, probs, source_probs, inputs.source, p.clear_margin,
                                  p.floor_inputs, seed)
            contract = input_contract_failures(path)
        except Exception as e:   # a file the runtime refuses fails the gate (one line)
            return {"name": name, "kind": kind, "source": source, "passed": False, "refused": str(e).splitlines()[0][:160]}
        seconds = time.perf_counter() - t0
    j = judge("int8", probs, source_probs, inputs.y, inputs.source, p, floor, seed)
    j.failures[:0] = contract
    j.verdict = describe(j)
    same = probs.argmax(-1) == source_probs.argmax(-1)
    by_margin = {}
    for m in MARGINS:
        c = clear_mask(source_probs, m)
        by_margin[str(m)] = {"n_clear": int(c.sum()), "agreement": float(same[c].mean()) if c.any() else None}
    return {"name": name, "kind": kind, "source": source, "passed": not j.failures, "failures": j.failures,
            "drop_points": j.accuracy_drop_points, "drop_interval": j.accuracy_drop_interval,
            "accuracy": j.accuracy, "source_accuracy": j.source_accuracy, "agreement": j.agreement,
            "clear_agreement": j.clear_agreement, "required": j.required_clear_agreement, "n_clear": j.n_clear,
            "n_images": j.n_images, "points_per_image": j.points_per_image,
            "floor_clear": None if floor is None else floor.clear_agreement,
            "floor_all": None if floor is None else floor.agreement,
            "floor_all_interval": None if floor is None else floor.interval,
            "floor_n": None if floor is None else floor.n,
            "source_on_floor_inputs": None if floor is None else floor.source_agreement,
            "source_on_floor_interval": None if floor is None else floor.source_interval, "by_margin": by_margin,
            "verdict": j.verdict, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------- runs
def train(folder: Path, out: Path, settings: dict, seed: int, qat_epochs: int):
    from edgeft import finetune
    from edgeft.data.demo import DEMO_WEIGHTS
    from edgeft.quantize.qat import run_qat

    if (out / "model.keras").is_file() and (not qat_epochs or (out / "model_qat.weights.h5").is_file()):
        print(f"  reusing the run in {out} (--keep)")   # a rerun with --keep trains nothing again
        return None
    cfg = {"weights": str(DEMO_WEIGHTS), **settings, "seed": seed}
    if folder is not None:
        cfg["folder"] = str(folder)
    res = finetune(cfg, out=out, overwrite=True)
    if qat_epochs:
        run_qat(out, epochs=qat_epochs, compare=False)
    return res


def healthy_files(run_dir: Path, label: str, rows: list, default_export: bool = True):
    from edgeft.export.keras2tflite import tflite_int8
    from edgeft.data.datasets import gate_inputs, representative_images
    from edgeft.core.errors import ParityError
    from edgeft.quantize.int8_choice import keras_probs
    from edgeft.export.keras2onnx import onnx_float_bytes, onnx_int8_bytes
    from edgeft.quantize.qat import load_qat_model
    from edgeft.run import Run

    run = Run.open(run_dir)
    # today's gate settings, not those the run stored when it was trained (a kept run may be older)
    from edgeft.core.config import ParityConfig

    run = Run.open(run_dir, replace(run.cfg, parity=replace(ParityConfig(), client_inputs=0)))
    cfg, splits, model = run.cfg, run.splits, run.model
    inputs = gate_inputs(splits.val, cfg)
    rep = representative_images(splits.train, cfg.export.rep_samples, cfg.train.seed)
    ref = keras_probs(model, inputs.x)
    files = [("ptq per-channel", tflite_int8(model, rep), ".tflite", ref, "ptq"),
             ("ptq per-tensor", tflite_int8(model, rep, granularity="per-tensor"), ".tflite", ref, "ptq")]
    if (run_dir / "model_qat.weights.h5").is_file():
        qat = load_qat_model(run)
        files.append(("qat per-channel", tflite_int8(qat, rep), ".tflite", keras_probs(qat, inputs.x), "qat"))
    onnx_float = onnx_float_bytes(model, cfg.data.image_size, cfg.export.opset, {})
    files.append(("ptq onnx", onnx_int8_bytes(onnx_float, rep, {}), ".onnx", ref, "ptq"))
    for name, data, suffix, src, source in files:
        rows.append(judge_file(f"{label}: {name}", data, suffix, inputs, src, cfg, "healthy", source))
        print(_row_line(rows[-1]), flush=True)
    if default_export:
        from edgeft.pipeline.exporter import export

        copy = run_dir.parent / f"{run_dir.name}-export"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy)
        t0 = time.perf_counter()
        try:
            export(Run.open(copy, cfg))
            status = 0
        except ParityError as e:
            status, _ = 1, e
        shipped = sorted(p.name for p in (copy / "export").glob("model_int8*"))
        rows.append({"name": f"{label}: default edgeft export", "kind": "export", "passed": status == 0,
                     "exit": status, "shipped_int8": shipped, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {rows[-1]['name']}: exit {status}, int8 files shipped: {', '.join(shipped) or 'none'}", flush=True)
    return run, inputs, rep, ref


def broken_files(run, inputs, rep, ref, label: str, rows: list, other_run=None, colour: bool = False):
    from edgeft._keras import tf
    from edgeft.export.keras2tflite import tflite_int8

    cfg, model = run.cfg, run.model
    good = tflite_int8(model, rep)
    cases = []
    if colour:
        cases.append(("swapped-rgb", int8_bytes(wrapped(model, lambda t: tf.reverse(t, axis=[-1])), rep)))
    else:
        cases += [("normalization", int8_bytes(wrapped(model, lambda t: t / 255.0), rep)),
                  ("blank-calib", int8_bytes(model, rep, blank=True)),
                  ("input-scale-2x", scaled_input(good, 2.0)),
                  ("truncated", good[:len(good) // 2]),
                  ("hand-edited", hand_edited(good))]
        if other_run is not None:
            cases.append(("other-run", tflite_int8(other_run.model, rep)))
    for name, data in cases:
        rows.append(judge_file(f"{label}: {name}", data, ".tflite", inputs, ref, cfg, "broken", "ptq"))
        print(_row_line(rows[-1]), flush=True)


def _row_line(r: dict) -> str:
    if "refused" in r:
        return f"  {r['name']:<36} {'FAIL' if not r['passed'] else 'pass'}  refused: {r['refused']}"
    lo, hi = r["drop_interval"]
    floor = "-" if r["floor_clear"] is None else f"{r['floor_clear']:.1%}"
    return (f"  {r['name']:<36} {'pass' if r['passed'] else 'FAIL'}  drop {r['drop_points']:5.1f} [{lo:5.1f}, {hi:5.1f}]"
            f"  clear agree {r['clear_agreement']:.1%} of {r['n_clear']} (floor {floor})  all {r['agreement']:.1%}"
            f"  {r['points_per_image']:.1f} pts/img")


def confusion(rows: list) -> dict:
    files = [r for r in rows if r["kind"] in ("healthy", "broken")]
    t = {k: {"pass": 0, "fail": 0} for k in ("healthy", "broken")}
    for r in files:
        t[r["kind"]]["pass" if r["passed"] else "fail"] += 1
    exports = [r for r in rows if r["kind"] == "export"]
    t["default exports exit 0"] = sum(r["exit"] == 0 for r in exports)
    t["default exports"] = len(exports)
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="suite seeds 1-2 and the colour run only")
    ap.add_argument("--json", help="write every row and the table here")
    ap.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    args = ap.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edgeft-bench-gate-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EDGEFT_CACHE", str(root / "cache"))
    from edgeft.run import Run

    rows: list = []
    t0 = time.time()
    folder = suite_folder(root / "suite_data")
    seeds = (1, 2) if args.quick else (1, 2, 3)
    runs = {}
    for seed in seeds:
        print(f"== suite, seed {seed}", flush=True)
        train(folder, root / f"suite{seed}", SUITE, seed, qat_epochs=1)
        runs[seed] = healthy_files(root / f"suite{seed}", f"suite s{seed}", rows)
    run, inputs, rep, ref = runs[seeds[0]]
    broken_files(run, inputs, rep, ref, f"suite s{seeds[0]}", rows, other_run=Run.open(root / f"suite{seeds[1]}"))
    print("== colour", flush=True)
    train(colour_folder(root / "colour_data"), root / "colour", SUITE, 1, qat_epochs=1)
    run, inputs, rep, ref = healthy_files(root / "colour", "colour", rows)
    broken_files(run, inputs, rep, ref, "colour", rows, colour=True)
    if not args.quick:
        print("== digits10", flush=True)
        d10 = digits10_folder(root / "digits10_data")
        train(d10, root / "digits10", DIGITS10, 42, qat_epochs=2)
        train(d10, root / "digits10b", DIGITS10, 7, qat_epochs=0)
        run, inputs, rep, ref = healthy_files(root / "digits10", "digits10", rows)
        broken_files(run, inputs, rep, ref, "digits10", rows, other_run=Run.open(root / "digits10b"))
        print("== demo", flush=True)
        train(None, root / "demo", {}, 42, qat_epochs=2)
        healthy_files(root / "demo", "demo", rows)
    table = confusion(rows)
    print(f"\nGate confusion table ({time.time() - t0:.0f} s):")
    print(f"  {'':<10} {'gate passes':>12} {'gate fails':>11}")
    for k in ("healthy", "broken"):
        print(f"  {k:<10} {table[k]['pass']:>12} {table[k]['fail']:>11}")
    print(f"  default `edgeft export` exit 0: {table['default exports exit 0']} of {table['default exports']}")
    print("\nClear-input agreement by clear margin (healthy min / broken max, files with an agreement failure "
          "mode only):")
    for m in MARGINS:
        h = [r["by_margin"][str(m)]["agreement"] for r in rows if r["kind"] == "healthy" and "by_margin" in r]
        b = [r["by_margin"][str(m)]["agreement"] for r in rows if r["kind"] == "broken" and "by_margin" in r
             and r["by_margin"][str(m)]["agreement"] is not None]
        h = [v for v in h if v is not None]
        print(f"  margin {m:<5} healthy min {min(h):.1%}  broken max {max(b) if b else float('nan'):.1%}")
    ok = table["healthy"]["fail"] == 0 and table["broken"]["pass"] == 0 and \
        table["default exports exit 0"] == table["default exports"]
    print(f"\n{'PASS' if ok else 'FAIL'}: goal 0 healthy failures, every broken file failing, every default export exit 0")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "rows": rows, "seconds": time.time() - t0},
                                              indent=2, default=float) + "\n")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
