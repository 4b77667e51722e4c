"""edgeft's default recipe on real ImageNet models and real folders, beside fixed bare Keras scripts.

    python tools/bench_real.py --out DIR                                   # every cell (hours on 2 cores)
    python tools/bench_real.py --out DIR --resume                          # finished cells are kept
    python tools/bench_real.py --out DIR --folders fashion --sizes 128 --seeds 1 --methods edgeft,bare

Folders (tools/real_folders.py; made once under DIR/folders): fashion (Debian dataset-fashion-mnist),
emoji (npm emoji-datasource-google), and digits64 (the project's own digits at 64 px: a smoke
setting, never evidence). For each folder and seed the folder's TRAIN part is split once into
train / validation (20 % per class, seeded; for emoji whole groups of skin-tone / gender variants,
tools/real_folders.emoji_group), written to DIR/splits/<folder>-s<seed>/, and every method is
given exactly those folders (edgeft: `--val VAL --test TEST`), so all methods early-stop on the same
validation images and are judged on the same TEST images.

Methods (each its own process):
  edgeft  `edgeft finetune TRAIN --val VAL --test TEST` with the default recipe, then the default
          `edgeft export` (every default format through the gate); then, on a copy of the run,
          `edgeft qat` and `edgeft export --tflite int8 --int8-source qat` for the QAT file
  bare    tools/bare_recipes.py bare (frozen + GAP head, early stopping, top 30 %, converter PTQ)
  seed    tools/bare_recipes.py seed (Flatten / Dense 256 / Dropout 0.5, 10 + 10 epochs, PTQ)

A cell is (folder, backbone, size, method, seed); each is written to DIR/cells/<cell>.json as soon
as it finishes (atomically), and --resume skips finished cells, so the measurement can span
sessions. Per cell: wall time of training (and of export), stage-1 / stage-2 seconds and images/s,
peak RSS, test accuracy of the Keras model, the int8 PTQ file and the int8 QAT file with 95 %
Wilson intervals, the gate's verdicts and floor, int8 p50 latency at 1 thread (the device script's
bench). The table (mean and spread over seeds) and DIR/bench_real.json are printed at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

FOLDERS = ("fashion", "emoji", "digits64")
METHODS = ("edgeft", "bare", "seed")
DIGITS_WEIGHTS = ROOT / "models" / "demo_mobilenet_v2_a035_32_digits04.weights.h5"


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(c - h, 4), round(c + h, 4)]


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- folders and splits
def folder(out: Path, name: str) -> Path:
    """DIR/folders/<name> with train/ and test/ (made once)."""
    if name == "digits64":
        return _digits64(out / "folders")
    from real_folders import build

    return build(name, out / "folders")


def _digits64(root: Path) -> Path:
    dest = root / "digits64"
    if (dest / "folder.json").is_file():
        return dest
    from PIL import Image

    from edgeft.data.demo import digit_images

    x, y = digit_images(tuple(range(10)), size=64, seed=11)
    rng = np.random.default_rng(5)
    tmp = root / ".digits64.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(y == d))
        for part, rows in (("train", idx[:40]), ("test", idx[40:120])):
            (tmp / part / str(d)).mkdir(parents=True, exist_ok=True)
            for i in rows:
                Image.fromarray(x[i]).save(tmp / part / str(d) / f"{i:05d}.png")
    (tmp / "folder.json").write_text(json.dumps({"name": "digits64", "source": "edgeft's own digit renderings "
                                                 "(scikit-learn digits), a smoke setting", "counts": {}}) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def split(out: Path, name: str, src: Path, seed: int) -> tuple[Path, Path, Path]:
    """(train, val, test) folders for one folder and seed, made once."""
    dest = out / "splits" / f"{name}-s{seed}"
    if not (dest / "done").is_file():
        from real_folders import emoji_group

        shutil.rmtree(dest, ignore_errors=True)
        rng = np.random.default_rng(seed)
        for cdir in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
            files = sorted(cdir.iterdir())
            key = (lambda p: emoji_group(p.stem)) if name == "emoji" else (lambda p: p.name)
            groups = sorted({key(p) for p in files})
            groups = [groups[i] for i in rng.permutation(len(groups))]
            n_val, val_groups = max(1, round(0.2 * len(files))), set()
            count = 0
            for g in groups:
                if count >= n_val:
                    break
                val_groups.add(g)
                count += sum(1 for p in files if key(p) == g)
            for p in files:
                part = "val" if key(p) in val_groups else "train"
                (dest / part / cdir.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dest / part / cdir.name / p.name)
        (dest / "done").write_text("")
    return dest / "train", dest / "val", src / "test"


# ---------------------------------------------------------------- running a command
def timed(cmd: list[str], log: Path, cwd: Path | None = None) -> dict:
    """Runs `cmd` in a wrapper process that reports its peak RSS; output appended to `log`."""
    wrapper = ("import resource, subprocess, sys, json\n"
               "r = subprocess.run(sys.argv[1:])\n"
               "print(json.dumps({'rc': r.returncode, 'peak_rss_mb': resource.getrusage("
               "resource.RUSAGE_CHILDREN).ru_maxrss / 1024}), file=sys.stderr)\n")
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        r = subprocess.run([sys.executable, "-c", wrapper, *map(str, cmd)], stdout=f, stderr=subprocess.PIPE,
                           text=True, cwd=cwd)
        f.write(r.stderr)
    info = json.loads(r.stderr.strip().splitlines()[-1])
    return {"rc": info["rc"], "seconds": round(time.time() - t0, 1), "peak_rss_mb": round(info["peak_rss_mb"], 1)}


DIGITS_BACKBONE = [DIGITS_WEIGHTS]   # --digits-weights
SKIP_QAT = [False]                   # --skip-qat


def weights_for(name: str, backbone: str) -> str:
    return str(DIGITS_BACKBONE[0]) if name == "digits64" else "imagenet"


def digits_label() -> str:
    """The digits64 cells' backbone name: `mobilenet_v2` for the shipped demo backbone (pretrained at
    32 px), `mobilenet_v2_pre<SIZE>` for one pretrained at another size (its .json beside the weights
    says which), so the two backbones' cells never share a key."""
    meta = Path(str(DIGITS_BACKBONE[0]).replace(".weights.h5", ".json"))
    size = json.loads(meta.read_text()).get("image_size", 32) if meta.is_file() else 32
    return "mobilenet_v2" if size == 32 else f"mobilenet_v2_pre{size}"


def edgeft_cell(cell: Path, name: str, backbone: str, size: int, seed: int, train, val, test,
                flags: list[str] | None = None, export: bool = True) -> dict:
    """The default recipe (or `flags` on top of it): finetune, then (with `export`) the default
    export, the device bench of the int8 file, and QAT + its int8 export on a copy of the run."""
    run = cell.with_suffix("") / "run"
    log = cell.with_suffix(".log")
    shutil.rmtree(run.parent, ignore_errors=True)
    run.parent.mkdir(parents=True)
    extra = ["--alpha", "0.35"] if backbone == "mobilenet_v2" else []
    ft = timed([sys.executable, "-m", "edgeft", "finetune", train, "--val", val, "--test", test, "--out", run, "--backbone", backbone,
                *extra, "--weights", weights_for(name, backbone), "--image-size", size, "--seed", seed, *(flags or [])], log)
    res = {"finetune": ft, "flags": flags or []}
    if ft["rc"] != 0:
        return res
    m = json.loads((run / "metrics.json").read_text())
    n_train = m.get("head", {}).get("n_train") or sum(1 for _ in Path(train).rglob("*.png"))
    res["stage1_seconds"] = m.get("head", {}).get("seconds")
    res["stage2_seconds"] = m.get("finetune", {}).get("seconds")
    res["stage1_val"] = m.get("head", {}).get("val_accuracy")
    res["stage2_val"] = m.get("finetune", {}).get("val_accuracy")
    res["stage1_kept"] = m.get("finetune", {}).get("kept_stage1", False)
    res["keras_test"] = m.get("test")
    res["n_train"] = n_train
    if not export:
        return res
    ex = timed([sys.executable, "-m", "edgeft", "export", run], log)
    res["export"] = ex
    parity = json.loads((run / "export" / "parity.json").read_text()) if (run / "export" / "parity.json").is_file() else {}
    res["gate"] = {r.get("file"): {"passed": r.get("passed"), "verdict": r.get("verdict"),
                                   "failures": r.get("failures")} for r in parity.get("rows", [])}
    res["floor"] = {r.get("file"): r.get("floor") for r in parity.get("rows", []) if r.get("floor")}
    ta = run / "export" / "test_accuracy.json"
    res["test_accuracy"] = json.loads(ta.read_text()) if ta.is_file() else {}
    int8 = run / "export" / "model_int8.tflite"
    if int8.is_file():
        bench = cell.with_suffix("") / "bench.json"
        timed([sys.executable, ROOT / "tools" / "edgeft_device.py", "bench", int8, "--random", "--threads", "1",
               "--runs", "50", "--json", bench], log)
        if bench.is_file():
            b = json.loads(bench.read_text())
            res["int8_p50_ms"] = b["results"][0]["invoke_ms"]["p50"] if "results" in b else None
    if SKIP_QAT[0]:
        return res
    qat = cell.with_suffix("") / "qat"
    shutil.copytree(run, qat, ignore=shutil.ignore_patterns("export", ".edgeft.lock"))
    q = timed([sys.executable, "-m", "edgeft", "qat", qat], log)
    res["qat"] = q
    if q["rc"] == 0:
        qe = timed([sys.executable, "-m", "edgeft", "export", qat, "--tflite", "int8", "--int8-source", "qat"], log)
        ta = qat / "export" / "test_accuracy.json"
        res["qat_export"] = qe
        res["qat_test_accuracy"] = json.loads(ta.read_text()) if ta.is_file() else {}
    return res


def bare_cell(cell: Path, name: str, method: str, backbone: str, size: int, seed: int, train, val, test) -> dict:
    log = cell.with_suffix(".log")
    cmd = [sys.executable, ROOT / "tools" / "bare_recipes.py", method, train, test, "--val", val, "--backbone",
           backbone, "--weights", weights_for(name, backbone), "--size", size, "--seed", seed]
    t = timed(cmd, log)
    out = [line for line in log.read_text().splitlines() if line.startswith("{\"recipe\"")]
    res = {"run": t}
    if t["rc"] == 0 and out:
        res |= json.loads(out[-1])
        n = res["n_test"]
        res["interval_95"] = wilson(round(res["accuracy"] * n), n)
        if "int8_accuracy" in res:
            res["int8_interval_95"] = wilson(round(res["int8_accuracy"] * n), n)
    return res


# ---------------------------------------------------------------- the table
def summary(cells: dict) -> list[dict]:
    rows = {}
    for key, c in cells.items():
        name, backbone, size, method, _seed = key.split("|")
        r = rows.setdefault((name, backbone, size, method), {"acc": [], "int8": [], "qat": [], "seconds": []})
        if method.startswith("ft:"):   # a stage-2 candidate: finetune only, the Keras model's test accuracy
            if (c.get("keras_test") or {}).get("accuracy") is not None:
                r["acc"].append(c["keras_test"]["accuracy"])
                r["seconds"].append(c["finetune"]["seconds"])
        elif method == "edgeft":
            ta = c.get("test_accuracy") or {}
            if "keras" in ta:
                r["acc"].append(ta["keras"]["accuracy"])
            if "tflite_int8" in ta:
                r["int8"].append(ta["tflite_int8"]["accuracy"])
            q = (c.get("qat_test_accuracy") or {}).get("tflite_int8")
            if q:
                r["qat"].append(q["accuracy"])
            if c.get("finetune", {}).get("rc") == 0:
                r["seconds"].append(c["finetune"]["seconds"])
        elif "accuracy" in c:
            r["acc"].append(c["accuracy"])
            if "int8_accuracy" in c:
                r["int8"].append(c["int8_accuracy"])
            r["seconds"].append(c["run"]["seconds"])
    out = []
    for (name, backbone, size, method), r in sorted(rows.items()):
        def ms(v):
            return (round(float(np.mean(v)), 4), round(float(np.ptp(v)), 4)) if v else (None, None)
        out.append({"folder": name, "backbone": backbone, "size": int(size), "method": method, "seeds": len(r["acc"]),
                    "accuracy": ms(r["acc"]), "int8": ms(r["int8"]), "qat_int8": ms(r["qat"]),
                    "seconds": ms(r["seconds"])[0]})
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--resume", action="store_true", help="keep finished cells")
    ap.add_argument("--folders", default="fashion,emoji")
    ap.add_argument("--backbones", default="efficientnet_lite0")
    ap.add_argument("--sizes", default="128")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="edgeft, bare, seed, and ft:NAME (finetune only, with --variant NAME's flags)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="a finetune candidate: e.g. --variant 'lr1e-4=--lr-finetune 1e-4' (method ft:lr1e-4)")
    ap.add_argument("--digits-weights", type=Path, default=DIGITS_WEIGHTS,
                    help="the digits64 folder's backbone (e.g. one pretrained at 64 px by "
                         "tools/pretrain_demo_backbone.py --size 64)")
    ap.add_argument("--skip-qat", action="store_true", help="edgeft cells: no QAT copy (time)")
    return ap


def main() -> None:
    a = build_parser().parse_args()
    DIGITS_BACKBONE[0] = a.digits_weights
    SKIP_QAT[0] = a.skip_qat
    variants = {}
    for v in a.variant:
        vname, _, flags = v.partition("=")
        variants[vname] = flags.split()
    cells_dir = a.out / "cells"
    if cells_dir.is_dir() and any(cells_dir.iterdir()) and not a.resume:
        sys.exit(f"{cells_dir} holds finished cells: --resume keeps them (or choose another --out)")
    cells_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    for name in a.folders.split(","):
        src = folder(a.out, name)
        for seed in map(int, a.seeds.split(",")):
            train, val, test = split(a.out, name, src, seed)
            for backbone in a.backbones.split(","):
                bb = "mobilenet_v2" if name == "digits64" else backbone
                label = digits_label() if name == "digits64" else bb
                for size in map(int, a.sizes.split(",")):
                    for method in a.methods.split(","):
                        key = f"{name}|{label}|{size}|{method}|{seed}"
                        cell = cells_dir / (key.replace("|", "_") + ".json")
                        if cell.is_file():
                            continue
                        print(f"bench_real: {key} ...", flush=True)
                        t0 = time.time()
                        if method.startswith("ft:"):
                            if method[3:] not in variants:
                                sys.exit(f"{method}: no --variant {method[3:]}=FLAGS")
                            res = edgeft_cell(cell, name, bb, size, seed, train, val, test, variants[method[3:]],
                                              export=False)
                        elif method == "edgeft":
                            res = edgeft_cell(cell, name, bb, size, seed, train, val, test)
                        else:
                            res = bare_cell(cell, name, method, bb, size, seed, train, val, test)
                        res |= {"key": key, "wall_seconds": round(time.time() - t0, 1),
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                        write_json(cell, res)
    cells = {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json"))}
    rows = summary(cells)
    print(f"{'folder':<9} {'backbone':<19} {'size':>4} {'method':<7} {'n':>2} {'accuracy (spread)':>18} "
          f"{'int8':>16} {'qat int8':>16} {'train s':>8}")
    for r in rows:
        def f(p):
            return "-" if p[0] is None else f"{p[0]:.4f} ({p[1]:.3f})"
        print(f"{r['folder']:<9} {r['backbone']:<19} {r['size']:>4} {r['method']:<7} {r['seeds']:>2} "
              f"{f(r['accuracy']):>18} {f(r['int8']):>16} {f(r['qat_int8']):>16} {r['seconds'] or '-':>8}")
    write_json(a.out / "bench_real.json", {"rows": rows, "cells": cells, "this_run_seconds": round(time.time() - t_all)})


if __name__ == "__main__":
    main()
