#!/usr/bin/env python
"""Multi-worker stage 1 against one process on the same folder, seed and global batch (issue 26 item 5,
issue 27: "within 3 points of one process on >= 300 validation images").

    python tools/bench_multiworker.py FOLDER --val-split 0.4 --seeds 1,2,3 --json out.json

Per seed: `edgeft finetune FOLDER --strategy multiworker` as two workers on 127.0.0.1 (TF_CONFIG,
batch B each) beside one process with batch 2B, stage 1 only where the flags say so; the validation
accuracy of stage 1 (metrics.json "head") of each, the difference in points, the number of validation
images, wall seconds. Dev-machine script (needs TensorFlow and edgeft); prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def finetune(folder: Path, out: Path, flags: list[str], env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgeft", "finetune", str(folder), "--out", str(out), "--overwrite", "--quiet", *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def one_seed(args, seed: int) -> dict:
    common = ["--backbone", args.backbone, "--weights", args.weights, "--image-size", str(args.image_size),
              "--val-split", str(args.val_split), "--test-split", "0", "--seed", str(seed),
              "--head-epochs", str(args.head_epochs), "--finetune-epochs", str(args.finetune_epochs),
              "--qat-epochs", "0"]
    work = args.work / f"seed{seed}"
    t0 = time.monotonic()
    one = finetune(args.folder, work / "one", common + ["--batch-size", str(2 * args.batch_size)])
    so, se = one.communicate()
    t_one = time.monotonic() - t0
    if one.returncode != 0:
        raise SystemExit(f"one process failed (exit {one.returncode}): {se[-2000:]}")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    t0 = time.monotonic()
    procs = [finetune(args.folder, work / "mw", common + ["--batch-size", str(args.batch_size), "--strategy", "multiworker"],
                      {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    outs = [p.communicate() for p in procs]
    t_mw = time.monotonic() - t0
    for p, (so, se) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode}): {se[-2000:]}")
    m_one = json.loads((work / "one" / "metrics.json").read_text())["head"]
    m_mw = json.loads((work / "mw" / "metrics.json").read_text())["head"]
    n_val = m_one.get("n")   # validation images stage 1 was scored on
    return {"seed": seed, "one_val_accuracy": m_one["val_accuracy"], "multiworker_val_accuracy": m_mw["val_accuracy"],
            "difference_points": 100 * (m_mw["val_accuracy"] - m_one["val_accuracy"]),
            "one_val_loss": m_one.get("val_loss"), "multiworker_val_loss": m_mw.get("val_loss"),
            "val_images": n_val, "one_wall_s": round(t_one, 1), "multiworker_wall_s": round(t_mw, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-multiworker"))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--val-split", type=float, default=0.4)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--head-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="per worker; one process gets twice this")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = [one_seed(args, int(s)) for s in args.seeds.split(",")]
    print("| seed | val images | one process | two workers | difference (points) | wall one / two (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['val_images']} | {r['one_val_accuracy']:.4f} | {r['multiworker_val_accuracy']:.4f} | "
              f"{r['difference_points']:+.1f} | {r['one_wall_s']} / {r['multiworker_wall_s']} |")
    out = {"folder": str(args.folder), "backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
           "val_split": args.val_split, "head_epochs": args.head_epochs, "finetune_epochs": args.finetune_epochs,
           "batch_size_per_worker": args.batch_size, "rows": rows,
           "max_abs_difference_points": max(abs(r["difference_points"]) for r in rows)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
