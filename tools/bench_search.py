"""`edgeft search` measured (issue 20's items (a)-(e)); prints tables and writes DIR/bench_search.json.

    python tools/bench_search.py --out /tmp/bench_search                  # (a)-(e)
    python tools/bench_search.py --out DIR --parts abc                    # search vs exhaustive only
    python tools/bench_search.py --out DIR --parts de --table-sizes 96,128,224

(a) the search's wall time against training every feasible candidate fully (stage 1 + 2, export
    and gate of the target file), one `edgeft` process each, same data and settings (goal <= 0.4x);
(b) the chosen candidate against the best of that exhaustive run (by the shipped file's
    validation accuracy: the same candidate, or within its Wilson interval);
(c) phase-1 latency of each untrained file against its trained, shipped file (goal: within 10 %
    or within the run-to-run spread of timing the same file three times, whichever is larger);
(d) phase-1 seconds per candidate (build + convert + time) at 96, 160 and 224 px, and the whole
    default space's phase 1 (`edgeft search --weights none` with a size limit nothing meets: phase 1
    runs to the end, then exit 1);
(e) a table like the STM32 model zoo's for this host: MobileNet V1 / V2 / V3 at each width and
    size, int8 file KB, p50 / p95 ms at 1 thread, TFLite Micro arena KB (bisected by TFLM).

Space for (a)-(c): MobileNetV2 alpha 0.35 at eight sizes (32-112 px) on the shipped demo backbone
(`--weights DIR` holding it as mobilenet_v2_a0.35.weights.h5: one file for every size), the demo's
digits 5-9. Every command is its own process, run one after another on a machine left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

WEIGHTS = ROOT / "models" / "demo_mobilenet_v2_a035_32_digits04.weights.h5"
SIZES = (32, 40, 48, 56, 64, 80, 96, 112)
# the default recipe (its epochs by the folder's size: 17 + 12 here), the same for both sides;
# --quick-train: 6 + 3 epochs
TRAIN = ["--seed", "1"]
QUICK_TRAIN = ["--head-epochs", "6", "--finetune-epochs", "3", "--batch-size", "32", "--seed", "1"]
SEARCH_FLAGS = ["--finalists", "2", "--keep", "0.25"]
ROUNDS = 5


def edgeft(*args, check=True) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgeft", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check and r.returncode != 0:
        raise SystemExit(f"edgeft {' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r


def shipped_val_accuracy(run: Path, filename: str = "model_int8.tflite") -> tuple[float, int]:
    import numpy as np

    from edgeft.device import open_runner
    from edgeft.run import Run

    handle = Run.open(run)
    runner = open_runner(run / "export" / filename, 1)
    val = handle.splits.val
    pred = np.concatenate([runner.predict(val.read(np.arange(i, min(i + 32, len(val.y)))).astype(np.float32)).argmax(-1)
                           for i in range(0, len(val.y), 32)])
    return float((pred == val.y).mean()), int(len(val.y))


def part_abc(out: Path, folder: Path, sizes) -> dict:
    from edgeft.core.stats import wilson_interval

    wdir = out / "weights"
    wdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(WEIGHTS, wdir / "mobilenet_v2_a0.35.weights.h5")
    space = ["--backbones", "mobilenet_v2", "--alphas", "0.35", "--sizes", ",".join(map(str, sizes)), "--weights", wdir]
    sdir = out / "search"
    shutil.rmtree(sdir, ignore_errors=True)
    search_s, _ = edgeft("search", folder, "--out", sdir, *space, *SEARCH_FLAGS, *TRAIN, "--quiet")
    res = json.loads((sdir / "results.json").read_text())
    rows = {r["id"]: r for r in res["candidates"]}
    chosen = next(r for r in res["candidates"] if r["chosen"])
    exhaustive, ex_s = {}, 0.0
    for size in sizes:
        cid = f"mobilenet_v2_a0.35_{size}"
        run = out / "exhaustive" / cid
        shutil.rmtree(run, ignore_errors=True)
        t1, _ = edgeft("finetune", folder, "--out", run, "--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights",
                       wdir / "mobilenet_v2_a0.35.weights.h5", "--image-size", size, *TRAIN, "--quiet")
        t2, r = edgeft("export", run, "--tflite", "int8", "--quiet", check=False)
        ex_s += t1 + t2
        acc, n = shipped_val_accuracy(run) if r.returncode == 0 else (None, 0)
        exhaustive[cid] = {"seconds": round(t1 + t2, 1), "gate": r.returncode == 0, "val_accuracy": acc, "val_n": n}
        print(f"exhaustive {cid}: {t1 + t2:.0f} s, shipped val accuracy {acc}")
    best_id = max((c for c in exhaustive if exhaustive[c]["val_accuracy"] is not None),
                  key=lambda c: exhaustive[c]["val_accuracy"])
    b = exhaustive[best_id]
    lo, hi = wilson_interval(round(b["val_accuracy"] * b["val_n"]), b["val_n"])
    ex_chosen = exhaustive[chosen["id"]]["val_accuracy"]
    lat = part_c(sdir, res)
    return {"search_seconds": round(search_s, 1), "exhaustive_seconds": round(ex_s, 1),
            "ratio": search_s / ex_s, "goal_ratio": 0.4, "chosen": chosen["id"],
            "chosen_shipped_val": chosen["shipped_val_accuracy"], "exhaustive_best": best_id,
            "exhaustive_best_val": b["val_accuracy"], "exhaustive_best_interval": [lo, hi],
            "chosen_in_exhaustive": ex_chosen, "b_ok": chosen["id"] == best_id or (ex_chosen is not None and lo <= ex_chosen),
            "exhaustive": exhaustive, "search_rows": rows, "latency": lat}


def part_c(sdir: Path, res: dict, rounds: int = ROUNDS) -> list[dict]:
    """(c): each finalist's untrained (phase-1) and trained (shipped) file, timed in `rounds`
    interleaved rounds, each timing a process of its own (the device script's bench); the
    difference of their median p50s against the spread of the same file's p50 over the rounds."""
    import numpy as np

    from edgeft.search.measure import time_file

    lat = []
    for r in res["candidates"]:
        if r["trained_latency_p50_ms"] is None:
            continue
        files = {"untrained": sdir / "phase1" / "files" / f"{r['id']}.tflite",
                 "trained": sdir / "runs" / r["id"] / "export" / "model_int8.tflite"}
        p50 = {k: [] for k in files}
        for _ in range(rounds):
            for k, f in files.items():
                p50[k].append(time_file(f, 1, 100, 10)["latency_ms"]["p50"])
        med = {k: float(np.median(v)) for k, v in p50.items()}
        spread = max((max(v) - min(v)) / float(np.median(v)) for v in p50.values())
        diff = abs(med["trained"] - med["untrained"]) / med["untrained"]
        lat.append({"id": r["id"], "untrained_p50": med["untrained"], "trained_p50": med["trained"],
                    "rounds": {k: [round(x, 4) for x in v] for k, v in p50.items()},
                    "search_phase1_p50": r["latency_p50_ms"], "search_phase3_p50": r["trained_latency_p50_ms"],
                    "difference": diff, "spread": spread, "within_goal": diff <= max(0.10, spread)})
    return lat


def part_d(out: Path, folder: Path) -> dict:
    from edgeft.core.config import build_config
    from edgeft.run import run_splits
    from edgeft.search import measure
    from edgeft.search.space import TARGETS, Candidate
    from edgeft.data.datasets import representative_images

    per = {}
    for size in (96, 160, 224):
        cfg = build_config({"folder": str(folder), "image_size": size, "weights": "none"})
        splits = run_splits(cfg)
        rep = representative_images(splits.train, measure.CALIBRATION_IMAGES, 1)
        t0 = time.perf_counter()
        data, _ = measure.untrained_file(Candidate("mobilenet_v2", 1.0, size), TARGETS["tflite-int8"],
                                         list(splits.classes), rep, cfg)
        path = out / "d" / f"mnv2_1.0_{size}.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        t1 = time.perf_counter()
        measure.measure(path, TARGETS["tflite-int8"], 1, 100, 10, want_arena=False)
        per[size] = {"convert_s": round(t1 - t0, 1), "time_s": round(time.perf_counter() - t1, 1),
                     "total_s": round(time.perf_counter() - t0, 1)}
        print(f"(d) mobilenet_v2 1.0 at {size} px: {per[size]}")
    ddir = out / "default_space"
    shutil.rmtree(ddir, ignore_errors=True)
    secs, r = edgeft("search", folder, "--out", ddir, "--weights", "none", "--max-size-kb", "1", "--quiet", check=False)
    n = len(list((ddir / "phase1").glob("*.json")))
    return {"per_candidate": per, "default_space_seconds": round(secs, 1), "default_space_candidates": n,
            "default_space_exit": r.returncode, "default_space_dir": str(ddir)}


def part_e(out: Path, sizes, d: dict | None) -> list[dict]:
    """From the default-space phase 1 (part d), with the TFLM arena bisected for `sizes`."""
    from edgeft.search.measure import tflm_numbers

    ddir = Path(d["default_space_dir"]) if d else out / "default_space"
    rows = []
    for f in sorted((ddir / "phase1").glob("*.json")):
        rec = json.loads(f.read_text())
        bb, _, rest = rec["id"].rpartition("_a")
        alpha, size = rest.split("_")
        row = {"id": rec["id"], "backbone": bb, "alpha": float(alpha), "size": int(size),
               "int8_kb": rec["size_bytes"] / 1000, "p50_ms": rec["latency_ms"]["p50"], "p95_ms": rec["latency_ms"]["p95"],
               "ram_mb": rec.get("ram_mb"), "arena_kb": None}
        if int(size) in sizes:
            row["arena_kb"] = tflm_numbers(ddir / rec["file"])["arena_bytes"] / 1000
        rows.append(row)
        print(f"(e) {row}")
    return rows


def print_c(rows: list[dict]) -> None:
    print(f"(c) candidate                untrained p50  trained p50  diff    spread ({ROUNDS} rounds)  within")
    for r in rows:
        print(f"    {r['id']:<26} {r['untrained_p50']:.4f}         {r['trained_p50']:.4f}       {r['difference']:5.1%}  "
              f"{r['spread']:5.1%}              {r['within_goal']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="abcde")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="sizes of the (a)-(c) space")
    p.add_argument("--table-sizes", default="96,128", help="sizes whose TFLite Micro arena (e) bisects")
    p.add_argument("--quick-train", action="store_true", help="6 + 3 epochs instead of the default recipe's")
    return p


def main() -> int:
    a = build_parser().parse_args()
    if a.quick_train:
        TRAIN[:] = QUICK_TRAIN
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from edgeft.data import demo

    folder = demo.build_demo_folder(out / "demo_digits")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    if a.parts == "c":   # re-time the finalists of the search already in DIR/search
        result["c"] = part_c(out / "search", json.loads((out / "search" / "results.json").read_text()))
        print_c(result["c"])
    elif set("abc") & set(a.parts):
        result["abc"] = part_abc(out, folder, [int(s) for s in a.sizes.split(",")])
        x = result["abc"]
        print(f"\n(a) search {x['search_seconds']:.0f} s vs exhaustive {x['exhaustive_seconds']:.0f} s: "
              f"{x['ratio']:.2f}x (goal <= 0.4x)")
        print(f"(b) chosen {x['chosen']} (exhaustive: {x['chosen_in_exhaustive']}); exhaustive best {x['exhaustive_best']} "
              f"{x['exhaustive_best_val']:.3f} [{x['exhaustive_best_interval'][0]:.3f}, {x['exhaustive_best_interval'][1]:.3f}]"
              f" -> {'ok' if x['b_ok'] else 'MISSED'}")
        print_c(x["latency"])
    if "d" in a.parts:
        result["d"] = part_d(out, folder)
        print(f"\n(d) per candidate: {result['d']['per_candidate']}; default space: "
              f"{result['d']['default_space_candidates']} candidates in {result['d']['default_space_seconds']:.0f} s")
    if "e" in a.parts:
        result["e"] = part_e(out, {int(s) for s in a.table_sizes.split(",")}, result.get("d"))
        print("\n| candidate | int8 KB | p50 ms | p95 ms | RAM MB | TFLM arena KB |\n|---|---|---|---|---|---|")
        for r in result["e"]:
            arena = "-" if r["arena_kb"] is None else f"{r['arena_kb']:.1f}"
            print(f"| {r['id']} | {r['int8_kb']:.1f} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['ram_mb']:.1f} | {arena} |")
    (out / "bench_search.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out / 'bench_search.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
