"""edgeft's default recipe against bare tf_keras scripts (tools/bare_recipes.py), on four settings.

    python tools/bench_recipe.py --out /tmp/bench_recipe                 # every setting, 3 seeds
    python tools/bench_recipe.py --out DIR --settings demo --seeds 1     # a cut-down run
    python tools/bench_recipe.py --out DIR --stage1                      # stage 1: cached views vs
                                                                         # today's cache vs end to end

Settings (scikit-learn's 1,797 bundled digits rendered as edgeft's demo renders them; within a
setting, train and test images are disjoint, and the test folder is large):
  digits10   10 classes, 400 training images, 64 px, the shipped backbone (pretrained on renderings
             of digits 0-4 at 32 px), 800 test images
  demo       the demo's digits 5-9 at 32 px on the shipped backbone, 400 training / 450 test images
  fewshot    10 classes, 15 images per class, 32 px, 600 test images
  imbalanced digits 5-9 with 100 / 60 / 40 / 30 / 20 training images, 32 px, 400 test images
             (balanced accuracy reported beside accuracy)

Methods: edgeft (the default `edgeft finetune FOLDER --test DIR`), edgeft-seed (`--recipe seed`),
bare-seed and bare-guide (tools/bare_recipes.py). Every run is its own process. Prints a table
(mean, spread = max - min over seeds, wall time) and writes DIR/bench_recipe.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WEIGHTS = ROOT / "models" / "demo_mobilenet_v2_a035_32_digits04.weights.h5"
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SETTINGS = {
    "digits10": dict(digits=tuple(range(10)), size=64, train={d: 40 for d in range(10)}, test_per_class=80),
    "demo": dict(digits=(5, 6, 7, 8, 9), size=32, train={d: 80 for d in (5, 6, 7, 8, 9)}, test_per_class=90),
    "fewshot": dict(digits=tuple(range(10)), size=32, train={d: 15 for d in range(10)}, test_per_class=60),
    "imbalanced": dict(digits=(5, 6, 7, 8, 9), size=32, train={5: 100, 6: 60, 7: 40, 8: 30, 9: 20},
                       test_per_class=80),
}
METHODS = ("edgeft", "edgeft-seed", "bare-seed", "bare-guide")


def write_setting(root: Path, name: str) -> tuple[Path, Path]:
    """TRAIN and TEST folders of a setting (disjoint source images), written once."""
    from PIL import Image

    from edgeft.data.demo import digit_images

    s = SETTINGS[name]
    train_dir, test_dir = root / name / "train", root / name / "test"
    if (root / name / "done").is_file():
        return train_dir, test_dir
    x, y = digit_images(s["digits"], size=s["size"], seed=11)
    rng = np.random.default_rng(5)
    for d in s["digits"]:
        idx = rng.permutation(np.flatnonzero(y == d))
        parts = {train_dir: idx[:s["train"][d]], test_dir: idx[s["train"][d]:s["train"][d] + s["test_per_class"]]}
        for folder, rows in parts.items():
            (folder / NAMES[d]).mkdir(parents=True, exist_ok=True)
            for i in rows:
                Image.fromarray(x[i]).save(folder / NAMES[d] / f"{i:04d}.png")
    (root / name / "done").write_text("ok\n")
    return train_dir, test_dir


def run_edgeft(train: Path, test: Path, out: Path, size: int, seed: int, extra=()) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "edgeft", "finetune", str(train), "--test", str(test), "--out", str(out),
           "--overwrite", "--weights", str(WEIGHTS), "--backbone", "mobilenet_v2", "--alpha", "0.35",
           "--image-size", str(size), "--seed", str(seed), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    m = json.loads((out / "metrics.json").read_text())
    t = m["test"]
    per_class = list(t["per_class_accuracy"].values())
    return {"accuracy": t["accuracy"], "balanced_accuracy": float(np.mean(per_class)), "n_test": t["n"],
            "seconds": round(time.time() - t0, 1), "stage1_seconds": m["head"]["seconds"],
            "choice": {k: m["head"].get("choice", {}).get(k) for k in ("policy", "label_smoothing", "lr_head")}}


def run_bare(recipe: str, train: Path, test: Path, size: int, seed: int) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "bare_recipes.py"), recipe, str(train), str(test),
           "--weights", str(WEIGHTS), "--size", str(size), "--seed", str(seed)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench(args) -> dict:
    out = Path(args.out)
    results_path = out / "bench_recipe.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.settings:
        train, test = write_setting(out / "data", name)
        size = SETTINGS[name]["size"]
        for method in args.methods:
            for seed in args.seeds:
                key = f"{name}/{method}/{seed}"
                if key in results and "error" not in results[key]:
                    continue   # a rerun continues where a killed one stopped
                if method.startswith("edgeft"):
                    extra = ("--recipe", "seed") if method == "edgeft-seed" else ()
                    r = run_edgeft(train, test, out / "runs" / key.replace("/", "_"), size, seed, extra)
                else:
                    r = run_bare(method.split("-")[1], train, test, size, seed)
                results[key] = r
                print(f"{key}: {json.dumps(r)}", flush=True)
                results_path.write_text(json.dumps(results, indent=1))
    return results


def table(results: dict, settings, methods) -> list[dict]:
    rows = []
    for name in settings:
        for method in methods:
            runs = [v for k, v in results.items() if k.startswith(f"{name}/{method}/") and "error" not in v]
            if not runs:
                continue
            acc = np.array([r["accuracy"] for r in runs])
            bal = np.array([r["balanced_accuracy"] for r in runs])
            rows.append({"setting": name, "method": method, "seeds": len(runs), "accuracy": round(acc.mean(), 4),
                         "spread": round(acc.max() - acc.min(), 4), "balanced_accuracy": round(bal.mean(), 4),
                         "seconds": round(float(np.mean([r["seconds"] for r in runs])), 1)})
    print(f"\n{'setting':<11} {'method':<12} {'seeds':>5} {'accuracy':>9} {'spread':>7} {'balanced':>9} {'s/run':>7}")
    for r in rows:
        print(f"{r['setting']:<11} {r['method']:<12} {r['seeds']:>5} {r['accuracy']:>9.4f} {r['spread']:>7.4f} "
              f"{r['balanced_accuracy']:>9.4f} {r['seconds']:>7.1f}")
    print("\ngoal: edgeft >= the better bare script + 2 points on each setting's mean; floor: never below it beyond the "
          "spread")
    for name in settings:
        got = {r["method"]: r for r in rows if r["setting"] == name}
        bare = [got[m] for m in ("bare-seed", "bare-guide") if m in got]
        if "edgeft" in got and bare:
            best = max(bare, key=lambda r: r["accuracy"])
            gap = 100 * (got["edgeft"]["accuracy"] - best["accuracy"])
            verdict = ("goal met" if gap >= 2 else "above the floor, goal missed" if gap >= -100 * max(
                best["spread"], got["edgeft"]["spread"]) else "BELOW THE FLOOR")
            print(f"{name}: edgeft {gap:+.1f} points vs {best['method']} -> {verdict}")
    return rows


def stage1(args) -> None:
    """Stage 1 alone (no stage 2), side by side: today's cache (one view, no augmentation), the
    default (cached views + the choice) and end to end (fresh augmentations every epoch)."""
    out = Path(args.out)
    rows = []
    train, test = write_setting(out / "data", "digits10")
    big = out / "data" / "big224"
    if not (big / "done").is_file():
        from PIL import Image

        from edgeft.data.demo import digit_images
        x, y = digit_images(range(10), size=224, seed=3)
        rng = np.random.default_rng(0)
        idx = rng.choice(len(y), 3000, replace=True)   # 3,000 images: each digit drawn again, shifted
        for k, i in enumerate(idx):
            img = np.roll(x[i], (int(rng.integers(-8, 9)), int(rng.integers(-8, 9))), (0, 1))
            (big / "train" / NAMES[y[i]]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(big / "train" / NAMES[y[i]] / f"{k:04d}.png")
        (big / "done").write_text("ok\n")
    demo_train, demo_test = write_setting(out / "data", "demo")
    cases = [("demo 32px", demo_train, demo_test, 32, WEIGHTS, {
        "today (--recipe seed --head gap: 1 view, no augmentation)": ["--recipe", "seed", "--head", "gap"],
        "default (cached views + choice)": []}),
             ("digits10 64px", train, test, 64, WEIGHTS, {
        "today (--recipe seed --head gap: 1 view, no augmentation)": ["--recipe", "seed", "--head", "gap"],
        "default (cached views + choice)": [],
        "end to end (online augmentation)": ["--augment-online", "--augment-policy", "upright",
                                             "--label-smoothing", "0.1", "--lr-head", "0.001"],
        "cached views, same settings": ["--augment-policy", "upright", "--label-smoothing", "0.1",
                                        "--lr-head", "0.001"]}),
             ("3,000 images 224px", big / "train", None, 224, "none", {
                 "today (--recipe seed --head gap: 1 view, no augmentation)": ["--recipe", "seed", "--head", "gap"],
                 "default (cached views + choice)": []})]
    for label, tr, te, size, weights, modes in cases:
        if args.cases and not any(label.startswith(c) for c in args.cases):
            continue
        for mode, extra in modes.items():
            run = out / "stage1" / f"{label}-{mode}".replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            cmd = [sys.executable, "-m", "edgeft", "finetune", str(tr), "--out", str(run), "--overwrite",
                   "--weights", str(weights), "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size",
                   str(size), "--finetune-epochs", "0", "--seed", "1", *(["--test", str(te)] if te else []), *extra]
            t0 = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                rows.append({"case": label, "mode": mode, "error": p.stderr.strip().splitlines()[-1]})
                print(rows[-1], flush=True)
                continue
            m = json.loads((run / "metrics.json").read_text())
            rows.append({"case": label, "mode": mode, "stage1_seconds": m["head"]["seconds"],
                         "features_seconds": m["head"].get("features_seconds"),
                         "choice_seconds": (m["head"].get("choice") or {}).get("seconds"),
                         "views": m["head"].get("views"), "val_accuracy": round(m["head"]["val_accuracy"], 4),
                         "test_accuracy": round(m["test"]["accuracy"], 4) if "test" in m else None,
                         "process_seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    print(f"\n{'case':<20} {'mode':<58} {'stage 1 s':>9} {'features s':>10} {'choice s':>8} {'views':>5} "
          f"{'val':>6} {'test':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<20} {r['mode']:<58} ERROR {r['error']}")
            continue
        print(f"{r['case']:<20} {r['mode']:<58} {r['stage1_seconds']:>9.1f} {r['features_seconds'] or 0:>10.1f} "
              f"{r['choice_seconds'] or 0:>8.1f} {r['views'] or 1:>5} {r['val_accuracy']:>6.3f} "
              f"{r['test_accuracy'] if r['test_accuracy'] is not None else '-':>6}")
    path = out / "bench_stage1.json"
    kept = [r for r in (json.loads(path.read_text()) if path.is_file() else [])
            if not any(r["case"] == n["case"] and r["mode"] == n["mode"] for n in rows)]
    path.write_text(json.dumps(kept + rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS))
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--stage1", action="store_true", help="the stage-1 comparison instead")
    ap.add_argument("--cases", type=lambda s: s.split(","), default=None,
                    help="--stage1 only: the cases whose names start with these (demo, digits10, 3,000)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage1:
        stage1(args)
        return
    results = bench(args)
    rows = table(results, args.settings, args.methods)
    (Path(args.out) / "bench_recipe_table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
