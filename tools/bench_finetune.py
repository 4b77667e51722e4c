"""Stage-1 speed: the naive seed loop against edgeft's cached-feature head training.

Naive (the seed recipe as usually written): a frozen VGG16 inside `Sequential`, `fit` every epoch,
so the frozen backbone recomputes the same features each epoch. edgeft: the backbone runs once
over the data, the head trains on cached features, then goes back on the flat model.
Same data, same head, same epochs, same batch size; both timed in this one process.

    python tools/bench_finetune.py                       # VGG16, 224 px, synthetic data, 10 epochs
    python tools/bench_finetune.py --data folder/ --json out.json
    python tools/bench_finetune.py --backbone mobilenet_v2 --alpha 0.35 --image-size 32 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def synthetic_folder(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """Noisy images with a class-dependent colour, written as PNG (real files, real decoding)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            img = np.clip(rng.normal(colour, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def time_naive(cfg, splits, epochs: int) -> tuple[float, float]:
    """The seed loop: frozen base nested in Sequential, preprocessing in the input pipeline."""
    from edgeft._keras import keras, tf
    from edgeft.nn.model import build_backbone
    from edgeft.core.registry import get_backbone

    bb = get_backbone(cfg.model.backbone)
    size = cfg.data.image_size
    base = build_backbone(cfg.model, keras.Input((size, size, 3)), size)
    base.trainable = False
    m = cfg.model
    model = keras.Sequential([base, keras.layers.Flatten() if m.head == "flatten" else keras.layers.GlobalAveragePooling2D()]
                             + ([keras.layers.Dense(m.dense, activation="relu")] if m.dense else [])
                             + [keras.layers.Dropout(m.dropout), keras.layers.Dense(len(splits.classes), activation="softmax")])
    model.compile(keras.optimizers.Adam(cfg.train.lr_head), "sparse_categorical_crossentropy", ["accuracy"])
    prep = getattr(keras.applications, {"caffe": "vgg16", "tf": "mobilenet_v2", "torch": "densenet"}[bb.preprocess]).preprocess_input

    def pipeline(x, y, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffle:
            ds = ds.shuffle(len(y), seed=0)
        return ds.batch(cfg.data.batch_size).map(lambda a, b: (prep(tf.cast(a, tf.float32)), b)).prefetch(2)

    t0 = time.perf_counter()
    model.fit(pipeline(splits.train.x, splits.train.y, True), epochs=epochs, verbose=0,
              validation_data=pipeline(splits.val.x, splits.val.y, False))
    seconds = time.perf_counter() - t0
    acc = model.evaluate(pipeline(splits.val.x, splits.val.y, False), verbose=0)[1]
    return seconds, float(acc)


def time_edgeft(cfg, splits, epochs: int) -> tuple[float, float, dict]:
    """edgeft's stage 1 as `edgeft finetune` runs it: the recipe's data-dependent values first
    (resolve_for_data: the cached views K for this many images), then train_head (features of K
    views, the choice of every knob left at auto, the head)."""
    from edgeft.train.distribute import make_scope
    from edgeft.train.recipe import backbone_macs, resolve_for_data
    from edgeft.train.stages import train_head
    from edgeft.nn.model import build_model
    from edgeft.train.report import evaluate_arrays

    cfg = replace(cfg, train=replace(cfg.train, head_epochs=epochs))
    model = build_model(cfg.model, cfg.data.image_size, len(splits.classes))
    # as `edgeft finetune` resolves them (train.stages): the views rule counts the backbone's cost
    cfg = resolve_for_data(cfg, len(splits.train), splits.train.y, len(splits.classes), backbone_macs(model))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, _, info = train_head(model, splits, cfg, Path(tmp), make_scope(cfg.train))
        seconds = time.perf_counter() - t0
    return seconds, evaluate_arrays(model, splits.val, splits.classes)["val_accuracy"], info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data", help="image folder (default: synthetic colour classes)")
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--alpha", type=float)
    p.add_argument("--weights", default="none", help="none (speed only), imagenet or PATH")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--head", default=None, choices=("flatten", "gap", "auto"),
                   help="edgeft's head (default: the recipe's own; the naive loop always has the seed's head, "
                        "Flatten -> Dense 256 -> Dropout 0.5, unless --head is given)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--classes", type=int, default=3, help="synthetic data: number of classes")
    p.add_argument("--per-class", type=int, default=20, help="synthetic data: images per class")
    p.add_argument("--recipe", default="default",
                   help="edgeft's recipe(s) for its side, comma-separated (default, seed): the naive loop runs once "
                        "and each recipe's stage 1 is timed against it in this process")
    p.add_argument("--json", help="write the results here")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from edgeft.core.config import build_config
    from edgeft.data.datasets import load_splits
    from edgeft.core.errors import UserError

    recipes = args.recipe.split(",")
    if not recipes or any(r not in ("default", "seed") for r in recipes):
        print(f"bench_finetune: error: --recipe {args.recipe}: default, seed or both", file=sys.stderr)
        return 2
    common = {"backbone": args.backbone, "alpha": args.alpha, "weights": args.weights,
              "image_size": args.image_size, "batch_size": args.batch_size}
    seed_head = {"head": args.head or "flatten", "dense": 256, "dropout": 0.5, "lr_head": 1e-4}
    try:
        naive_cfg = build_config({"recipe": "seed", **common, **seed_head})
        cfgs = {r: build_config({"recipe": r, **common, **(seed_head if r == "seed" else
                                                           ({"head": args.head} if args.head else {}))})
                for r in recipes}
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.data or str(synthetic_folder(Path(tmp), args.classes, args.per_class, args.image_size))
            splits = load_splits(folder, args.image_size, 0.2, seed=0)
    except UserError as e:
        print(f"bench_finetune: error: {e}", file=sys.stderr)
        return 2
    naive_s, naive_acc = time_naive(naive_cfg, splits, args.epochs)
    sides = {}
    for r, cfg in cfgs.items():
        edge_s, edge_acc, info = time_edgeft(cfg, splits, args.epochs)
        m = cfg.model
        sides[r] = {"edgeft_seconds": round(edge_s, 3), "speedup": round(naive_s / edge_s, 2),
                    "edgeft_val_accuracy": edge_acc,   # the head stage 1 trained (--head auto: the one it chose)
                    "head": f"{(info.get('choice') or {}).get('head') or m.head}" + (f" + Dense {m.dense}" if m.dense else ""),
                    "views": info.get("views", 1), "features_seconds": info.get("features_seconds"),
                    "choice_seconds": (info.get("choice") or {}).get("seconds")}
    first = sides[recipes[0]]
    result = {
        "backbone": args.backbone, "image_size": args.image_size, "epochs": args.epochs,
        "train_images": int(len(splits.train.y)), "val_images": int(len(splits.val.y)),
        "batch_size": args.batch_size, "naive_seconds": round(naive_s, 3), "naive_val_accuracy": naive_acc,
        "naive_head": f"{naive_cfg.model.head} + Dense 256",
        "recipe": recipes[0], **first, "recipes": sides,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": __import__("os").cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"\nstage 1, {args.backbone} {args.image_size}px, {args.epochs} epochs, "
          f"{result['train_images']} train / {result['val_images']} val images")
    print(f"{'method':<52}{'seconds':>10}{'val acc':>10}{'speed-up':>10}")
    print(f"{'naive (frozen base in Sequential, fit; seed head)':<52}{naive_s:>10.2f}{naive_acc:>10.3f}{'':>10}")
    for r, side in sides.items():
        label = f"edgeft --recipe {r} ({side['head']}, {side['views']} view(s))"
        print(f"{label:<52}{side['edgeft_seconds']:>10.2f}{side['edgeft_val_accuracy']:>10.3f}{side['speedup']:>9}x")
    if args.json:
        tmp = Path(args.json).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.json)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
