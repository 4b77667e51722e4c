#!/usr/bin/env python
"""Stage-1 options decided on cached features: one backbone pass per folder and size, every option,
3 seeds, in one process (issue 27, item 2).

    python tools/bench_stage1.py --out /work/bench_real                      # fashion, emoji at 128 px
    python tools/bench_stage1.py --out /work/bench_real --folders fashion --sizes 224
    python tools/bench_stage1.py --out /work/bench_real --folders digits64 --backbone mobilenet_v2 \\
        --weights models/demo_mobilenet_v2_a035_32_digits04.weights.h5 --sizes 64
    (a backbone pretrained by tools/pretrain_demo_backbone.py --size 64: its .json beside the weights
    gives alpha and the size, and the key says _pre64, as tools/bench_real.py's cells do)

Dev-machine script (TensorFlow). Folders and splits are tools/bench_real.py's (DIR/folders,
DIR/splits/<folder>-s<split seed>): the same train / validation / test images the full runs use.
For one (folder, backbone, size):

1. edgeft's own stage-1 feature pass (edgeft.train.stage1.cache_features, the run's model built by
   edgeft.nn.model.build_model): K views of every training image (view 0 the image itself, the
   others augmented by the photo policy, with which are mirrored), the validation and test images
   once. Cached in DIR/stage1/<key>/features.npz, reused by later calls.
2. Every option trained as edgeft's stage 1 trains its head on cached features
   (edgeft.train.choose.train_heads: Keras' Adam, warm-up + cosine, label smoothing, dropout, L2;
   proven equal to the Keras head by tests/test_choose.py), for the epochs edgeft's rule gives its
   rows (edgeft.train.recipe.head_epochs_for), with each seed (initial weights, batch order,
   dropout masks). Options: the head (GAP, Flatten, GAP or Flatten + Dense 256 relu + Dropout 0.5),
   the rows (views: none = the images only, upright = view 0 and the views not mirrored, photo2 =
   two views, photo = all K), label smoothing 0 / 0.1, head learning rate 3e-4 / 1e-3 / 3e-3 / 1e-2,
   the epochs edgeft's step rule gives (x1) or three times as many (x3).
3. What the default does: edgeft's cross-validation (edgeft.train.choose.choose, the documented
   prior unless a paired sign test says otherwise) run on the same features for each seed, and the
   test accuracy of the head it picks.

Each option's validation and test accuracy per seed go to DIR/stage1/<key>/options_<head>.json as
each head finishes (a finished head with the same grid is skipped unless --redo), all of them to
DIR/stage1/<key>/results.json; the table prints mean, spread
(sample standard deviation over seeds) and rank by mean test accuracy. Test images are never used
to choose anything here: the table is for people deciding defaults, and says so.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

HEADS = {   # name: (pooling, hidden Dense units, dropout)
    "gap": ("gap", 0, 0.2),                # edgeft's default head
    "flatten": ("flatten", 0, 0.2),
    "gap-dense256": ("gap", 256, 0.5),
    "flatten-dense256": ("flatten", 256, 0.5),   # the seed's head (its own script: Adam 1e-4, no L2)
}
ARMS = ("none", "upright", "photo2", "photo")
SMOOTHINGS = (0.0, 0.1)
LRS = (3e-4, 1e-3, 3e-3, 1e-2)
STEPS = (1, 3)   # x edgeft's stage-1 step rule (recipe.HEAD_STEPS): as many epochs, or three times as many
BATCH = 32


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def features(where: Path, train: Path, val: Path, test: Path, backbone: str, weights: str, size: int, views: int,
             seed: int) -> dict:
    """The backbone features of every view (edgeft's own stage-1 pass), cached in where/features.npz."""
    path = where / "features.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    import tempfile

    from edgeft.core.config import build_config
    from edgeft.data.augment import policy
    from edgeft.data.datasets import load_splits
    from edgeft.nn.model import build_model, feature_extractor
    from edgeft.train.stage1 import cache_features

    values = {"folder": str(train), "val_dir": str(val), "test_dir": str(test), "backbone": backbone,
              "weights": weights, "image_size": size, "seed": seed}
    if backbone.startswith("mobilenet"):
        values["alpha"] = backbone_meta(weights).get("alpha", 0.35 if "demo" in weights else 1.0)
    cfg = build_config(values)
    splits = load_splits(str(train), size, 0.2, seed, False, str(val), 0.0, str(test))
    model = build_model(cfg.model, size, len(splits.classes))
    extractor = feature_extractor(model)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        f_train, flipped = cache_features(extractor, splits.train, BATCH, "train views", Path(tmp) / "t", views,
                                          policy("photo"), seed)
        f_val, _ = cache_features(extractor, splits.val, BATCH, "val", Path(tmp) / "v")
        f_test, _ = cache_features(extractor, splits.test, BATCH, "test", Path(tmp) / "s")
        out = {"train": f_train.read(np.arange(len(splits.train.y) * views)), "flipped": flipped,
               "y_train": np.asarray(splits.train.y, np.int64), "val": f_val.read(np.arange(len(splits.val.y))),
               "y_val": np.asarray(splits.val.y, np.int64), "test": f_test.read(np.arange(len(splits.test.y))),
               "y_test": np.asarray(splits.test.y, np.int64), "views": np.array(views),
               "seconds": np.array(time.time() - t0), "classes": np.array(splits.classes)}
    where.mkdir(parents=True, exist_ok=True)
    tmp_path = where / ".features.npz.tmp.npz"
    np.savez(tmp_path, **out)
    os.replace(tmp_path, path)
    return out


def arm_rows(arm: str, n: int, views: int, flipped: np.ndarray) -> np.ndarray:
    """Row indices (view-major: row v * n + i) of the training rows an arm trains on."""
    rows = np.arange(n * views)
    if arm == "none":
        return rows[:n]
    if arm == "upright":
        return rows[(rows < n) | ~flipped]
    if arm == "photo2":
        return rows[:2 * n]
    return rows


def accuracy(params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from edgeft.train.choose import logits

    return (logits(params, x).argmax(-1) == y[None]).mean(-1)


def sweep_head(f: dict, seeds: list[int], head: str, arms: list[str], smoothings, lrs, steps) -> list[dict]:
    from edgeft.train.choose import HeadTraining, pool, train_heads
    from edgeft.train.recipe import head_epochs_for

    n, views = len(f["y_train"]), int(f["views"])
    ncls = len(f["classes"])
    out = []
    pooling, dense, dropout = HEADS[head]
    x_all = pool(f["train"], pooling)
    x_val, x_test = pool(f["val"], pooling), pool(f["test"], pooling)
    opts = list(itertools.product(smoothings, lrs))
    for arm in arms:
        rows = arm_rows(arm, n, views, f["flipped"])
        x, y = x_all[rows], np.tile(f["y_train"], views)[rows]
        for mult, seed in itertools.product(steps, seeds):
            epochs = head_epochs_for(len(rows), BATCH) * mult
            t0 = time.time()
            h = HeadTraining(ncls, epochs, BATCH, dropout, 1e-4, dense, 0.1, "cosine", seed)
            masks = np.ones((len(opts), len(y)), np.float32)
            ls = np.array([o[0] for o in opts], np.float32)
            lr = np.array([o[1] for o in opts], np.float32)
            per = len(opts) if not dense else 2   # a hidden layer on flattened features is large
            for lo, hi, params in train_heads(x, y, masks, np.ones(len(y), np.float32), ls, lr, h, per):
                val_acc, test_acc = accuracy(params, x_val, f["y_val"]), accuracy(params, x_test, f["y_test"])
                for g in range(hi - lo):
                    s, r = opts[lo + g]
                    out.append({"head": head, "arm": arm, "label_smoothing": s, "lr_head": r, "seed": seed,
                                "epochs": epochs, "steps_x": mult, "rows": int(len(rows)), "val": float(val_acc[g]),
                                "test": float(test_acc[g])})
            print(f"  {head} {arm} x{mult} seed {seed}: {len(opts)} heads, {epochs} epochs on {len(rows)} rows, "
                  f"{time.time() - t0:.1f}s", flush=True)
    return out


def default_choice(f: dict, seeds: list[int]) -> list[dict]:
    """What edgeft's default picks (its cross-validation on the training views, GAP head), per seed,
    and that head's test accuracy when trained on all rows of its arm."""
    from edgeft.train.choose import LABEL_SMOOTHING_OPTIONS, LR_HEAD_OPTIONS, HeadTraining, Rows, choose, pool, train_heads
    from edgeft.train.recipe import head_epochs_for

    n, views = len(f["y_train"]), int(f["views"])
    ncls = len(f["classes"])
    x_all = pool(f["train"], "gap")
    out = []
    for seed in seeds:
        rows = Rows(x_all, np.tile(f["y_train"], views), np.tile(np.arange(n), views), np.repeat(np.arange(views), n),
                    f["flipped"], np.random.default_rng([seed, 32]).random(n * views) < 0.5)
        c = choose(rows, ncls, arms=("photo", "upright", "none"), smoothings=LABEL_SMOOTHING_OPTIONS,
                   lrs=LR_HEAD_OPTIONS, epochs=head_epochs_for(n * views, BATCH), batch=BATCH, dropout=0.2, l2=1e-4,
                   dense=0, warmup=0.1, schedule="cosine", class_weights=None, seed=seed)
        keep = arm_rows(c.policy, n, views, f["flipped"])
        h = HeadTraining(ncls, head_epochs_for(len(keep), BATCH), BATCH, 0.2, 1e-4, 0, 0.1, "cosine", seed)
        (_, _, params), = train_heads(x_all[keep], np.tile(f["y_train"], views)[keep], np.ones((1, len(keep)), np.float32),
                                      np.ones(len(keep), np.float32), np.array([c.label_smoothing], np.float32),
                                      np.array([c.lr_head], np.float32), h)
        out.append({"seed": seed, "policy": c.policy, "label_smoothing": c.label_smoothing, "lr_head": c.lr_head,
                    "val": float(accuracy(params, pool(f["val"], "gap"), f["y_val"])[0]),
                    "test": float(accuracy(params, pool(f["test"], "gap"), f["y_test"])[0]), "cv": c.scores})
    return out


def backbone_meta(weights: str) -> dict:
    """The .json tools/pretrain_demo_backbone.py writes beside a backbone it pretrained ({} otherwise)."""
    meta = Path(str(weights).replace(".weights.h5", ".json"))
    return json.loads(meta.read_text()) if meta.is_file() else {}


def table(key: str, res: dict) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for r in res["options"]:
        groups.setdefault((r["head"], r["arm"], r["label_smoothing"], r["lr_head"], r.get("steps_x", 1)), []).append(r)
    rows = []
    for (head, arm, s, lr, _), rs in groups.items():
        t, v = [r["test"] for r in rs], [r["val"] for r in rs]
        rows.append((statistics.mean(t), statistics.stdev(t) if len(t) > 1 else 0.0, statistics.mean(v), head, arm,
                     s, lr, rs[0]["epochs"]))
    rows.sort(reverse=True)
    n_test = res["n_test"]
    lines = [f"### {key} (test n={n_test}, val n={res['n_val']}, {len(res['seeds'])} seeds; features "
             f"{res['feature_seconds']:.0f} s, heads {res['sweep_seconds']:.0f} s)", "",
             "| rank | head | rows | smoothing | lr | epochs | test mean | sd | val mean |", "|---|---|---|---|---|---|---|---|---|"]
    for k, (t, sd, v, head, arm, s, lr, ep) in enumerate(rows, 1):
        lines.append(f"| {k} | {head} | {arm} | {s} | {lr:g} | {ep} | {t:.4f} | {sd:.4f} | {v:.4f} |")
    d = res["default"]
    if d:
        t = [r["test"] for r in d]
        picks = ", ".join(f"s{r['seed']}: {r['policy']}/{r['label_smoothing']}/{r['lr_head']:g}" for r in d)
        lines += ["", f"edgeft's default (GAP, its cross-validation's pick: {picks}): test {statistics.mean(t):.4f} "
                      f"sd {statistics.stdev(t) if len(t) > 1 else 0.0:.4f}"]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="tools/bench_real.py's DIR (folders, splits)")
    ap.add_argument("--folders", default="fashion,emoji")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--sizes", default="128")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--split-seed", type=int, default=1, help="which DIR/splits/<folder>-s<N> split")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--smoothings", default=",".join(map(str, SMOOTHINGS)))
    ap.add_argument("--lrs", default=",".join(map(str, LRS)))
    ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="multiples of edgeft's stage-1 step rule")
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args(argv)
    from bench_real import folder as make_folder, split

    seeds = [int(s) for s in args.seeds.split(",")]
    report = []
    for name in args.folders.split(","):
        src = make_folder(args.out, name)
        train, val, test = split(args.out, name, src, args.split_seed)
        for size in [int(s) for s in args.sizes.split(",")]:
            pre = backbone_meta(args.weights).get("image_size")   # a backbone we pretrained: at which size
            label = args.backbone + (f"_pre{pre}" if pre and pre != 32 else "")   # as tools/bench_real.py keys it
            key = f"{name}_{label}_{size}_s{args.split_seed}"
            where = args.out / "stage1" / key
            print(f"bench_stage1: {key}", flush=True)
            f = features(where, train, val, test, args.backbone, args.weights, size, args.views, args.split_seed)
            grid = (args.arms, args.smoothings, args.lrs, args.steps, args.seeds)
            for head in args.heads.split(","):   # each head's options written as they finish (resumable)
                done = where / f"options_{head}.json"
                if done.is_file() and not args.redo and json.loads(done.read_text())["grid"] == list(grid):
                    continue
                t0 = time.time()
                opts = sweep_head(f, seeds, head, args.arms.split(","), [float(v) for v in args.smoothings.split(",")],
                                  [float(v) for v in args.lrs.split(",")], [int(v) for v in args.steps.split(",")])
                write_json(done, {"grid": list(grid), "seconds": round(time.time() - t0, 1), "options": opts})
            dflt = where / "default.json"
            if not dflt.is_file() or args.redo:
                write_json(dflt, {"seeds": seeds, "default": default_choice(f, seeds)})
            parts = [json.loads(p.read_text()) for p in sorted(where.glob("options_*.json"))]
            res = {"key": key, "folder": name, "backbone": args.backbone, "weights": args.weights, "size": size,
                   "views": args.views, "seeds": seeds, "n_train": int(len(f["y_train"])),
                   "n_val": int(len(f["y_val"])), "n_test": int(len(f["y_test"])),
                   "feature_seconds": float(f["seconds"]), "sweep_seconds": sum(p["seconds"] for p in parts),
                   "options": [o for p in parts for o in p["options"]],
                   "default": json.loads(dflt.read_text())["default"]}
            write_json(where / "results.json", res)
            lines = table(key, res)
            print("\n".join(lines), flush=True)
            report += lines + [""]
    (args.out / "stage1").mkdir(parents=True, exist_ok=True)
    (args.out / "stage1" / "table.md").write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
