#!/usr/bin/env python
"""The cost of stage 1's cross-validation (edgeft.train.choose) by feature width, and of the dropout
masks it draws, per random-number algorithm (docs/benchmarks.md, "Sixth session").

    python tools/bench_choice_speed.py                        # widths 1280, 20480, 62720; both RNGs
    python tools/bench_choice_speed.py --widths 62720 --json out.json

Dev-machine script (TensorFlow). Rows are random (the cost does not depend on what they hold): 400
images x 4 views, 10 classes, one policy, smoothing 0, head rates (3e-3, 1e-2), 3 folds (6 heads),
6 epochs, batch 32, dropout 0.2, as stage 1 would train a GAP (1,280 wide: Lite0) or Flatten head
(20,480: Lite0 at 128 px; 62,720: at 224 px). The RNG part times 300 masks of 32 x WIDTH inside one
XLA program, as the choice draws them, with each algorithm. Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def time_choice(width: int, images: int = 400, views: int = 4, classes: int = 10) -> float:
    import numpy as np

    from edgeft.train.choose import Rows, choose

    rng = np.random.default_rng(0)
    n = images * views
    rows = Rows(rng.normal(0, 1, (n, width)).astype(np.float32), np.tile(np.arange(images) % classes, views),
                np.tile(np.arange(images), views), np.repeat(np.arange(views), images), rng.random(n) < 0.5,
                rng.random(n) < 0.5)
    t0 = time.perf_counter()
    choose(rows, classes, arms=("photo",), smoothings=(0.0,), lrs=(3e-3, 1e-2), epochs=6, batch=32, dropout=0.2,
           l2=1e-4, dense=0, warmup=0.1, schedule="cosine", class_weights=None, seed=1)
    return time.perf_counter() - t0


def time_masks(width: int, alg: str, steps: int = 300, batch: int = 32) -> float:
    from edgeft._keras import tf

    @tf.function(jit_compile=True, autograph=False)
    def loop():
        def body(t, acc):
            u = tf.random.stateless_uniform([batch, width], seed=tf.stack([tf.constant(1, tf.int32), t]), alg=alg)
            return t + 1, acc + tf.reduce_sum(tf.cast(u >= 0.2, tf.float32))
        return tf.while_loop(lambda t, a: t < steps, body, (tf.constant(0), tf.constant(0.0)))[1]

    loop()   # compiled first: the time is the program's run
    t0 = time.perf_counter()
    loop()
    return time.perf_counter() - t0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--widths", default="1280,20480,62720")
    ap.add_argument("--algs", default="philox,threefry", help="RNG algorithms for the mask timing")
    ap.add_argument("--json", type=Path)
    return ap


def main() -> None:
    a = build_parser().parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    out = {"choice_seconds": {}, "mask_seconds": {}}
    for w in widths:
        out["choice_seconds"][w] = round(time_choice(w), 2)
        out["mask_seconds"][w] = {alg: round(time_masks(w, alg), 2) for alg in a.algs.split(",")}
    print(f"{'width':>7} {'choice s':>9} " + " ".join(f"{'masks ' + g:>16}" for g in a.algs.split(",")))
    for w in widths:
        print(f"{w:>7} {out['choice_seconds'][w]:>9} "
              + " ".join(f"{out['mask_seconds'][w][g]:>16}" for g in a.algs.split(",")))
    print(json.dumps(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
