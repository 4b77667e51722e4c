"""Pretrains the small backbone shipped for the offline demo, and checks that it transfers.

MobileNetV2 (alpha 0.35, 32 px) is trained from scratch on scikit-learn's bundled digits 0-4
(no download), with the same in-model preprocessing edgeft uses. Only the backbone weights
(include_top=False) are saved, to models/. Then the transfer check: on the demo task (digits 5-9,
never seen in pretraining) the same head is trained on frozen features of (a) this backbone and
(b) a randomly initialised one; pretraining must clearly win.

    python tools/pretrain_demo_backbone.py            # ~3-5 minutes on 2 CPU cores
    python tools/pretrain_demo_backbone.py --size 64 --out /work/bench_real/digits64_backbone.weights.h5

`--size 64` pretrains the same network at 64 px (its last feature map 2 x 2): the held-out digits
setting of issue 27 (tools/bench_real.py --digits-weights), not the shipped demo backbone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeft._keras import keras, tf  # noqa: E402
from edgeft.data.demo import (DEMO_ALPHA, DEMO_DIGITS, DEMO_IMAGE_SIZE, DEMO_WEIGHTS, PRETRAIN_DIGITS,  # noqa: E402
                         digit_images)
from edgeft.core.rundir import atomic_path, write_json  # noqa: E402
from edgeft.layers import Preprocess  # noqa: E402


ROTATIONS = 4


SIZE = [DEMO_IMAGE_SIZE]   # the pretraining size (--size)


def pretrain_data(copies: int, seed: int):
    """Differently coloured / shifted renderings of digits 0-4, each at 4 rotations, labelled
    (digit, rotation): 20 classes make richer, less task-collapsed features than 5 would."""
    xs, ys = [], []
    for k in range(copies):
        x, y = digit_images(PRETRAIN_DIGITS, size=SIZE[0], seed=seed + k)
        rot = k % ROTATIONS
        xs.append(np.rot90(x, rot, axes=(1, 2)))
        ys.append(y * ROTATIONS + rot)
    return np.concatenate(xs), np.concatenate(ys)


def backbone_on(x):
    return keras.applications.MobileNetV2(input_tensor=x, alpha=DEMO_ALPHA, include_top=False, weights=None)


def build_classifier(num_classes: int):
    inputs = keras.Input((SIZE[0], SIZE[0], 3))
    base = backbone_on(Preprocess("tf")(inputs))
    for layer in base.layers:   # keras' 0.999 keeps tiny from-scratch trainings at chance
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Dropout(0.2)(x)
    out = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, out), base


def split(y, frac: float, seed: int):
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: int(round(frac * (y == c).sum()))]
                          for c in np.unique(y)])
    return np.setdiff1d(np.arange(len(y)), val), np.sort(val)


def head_accuracy(base_weights: str | None, seed: int, epochs: int) -> float:
    """Val accuracy of GAP -> Dense 256 relu -> Dropout 0.5 -> softmax on frozen features."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE[0], SIZE[0], 3))
    base = backbone_on(Preprocess("tf")(inputs))
    if base_weights:
        base.load_weights(base_weights)
    features = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(base.output))
    x, digits = digit_images(DEMO_DIGITS, size=SIZE[0], seed=1000)
    y = digits - min(DEMO_DIGITS)
    tr, va = split(y, 0.2, seed)
    f = features.predict(x.astype("float32"), batch_size=128, verbose=0)
    head = keras.Sequential([keras.layers.Dense(256, activation="relu"), keras.layers.Dropout(0.5),
                             keras.layers.Dense(len(DEMO_DIGITS), activation="softmax")])
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    head.fit(f[tr], y[tr], epochs=epochs, batch_size=32, verbose=0, validation_data=(f[va], y[va]))
    return float(head.evaluate(f[va], y[va], verbose=0)[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--copies", type=int, default=12, help="renderings of each pretraining digit (rotation = copy %% 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head-epochs", type=int, default=30, help="epochs of the transfer-check head")
    p.add_argument("--size", type=int, default=DEMO_IMAGE_SIZE, help="pretraining image size (the demo: 32)")
    p.add_argument("--out", default=None, help=f"where the weights go (default: {DEMO_WEIGHTS} at 32 px, else "
                   "models/demo_mobilenet_v2_a035_SIZE_digits04.weights.h5)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    SIZE[0] = args.size
    if args.out is None:
        args.out = str(DEMO_WEIGHTS if args.size == DEMO_IMAGE_SIZE
                       else DEMO_WEIGHTS.with_name(f"demo_mobilenet_v2_a035_{args.size}_digits04.weights.h5"))

    keras.utils.set_random_seed(args.seed)
    x, y = pretrain_data(args.copies, args.seed)
    tr, va = split(y, 0.15, args.seed)
    model, base = build_classifier(len(PRETRAIN_DIGITS) * ROTATIONS)
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, args.epochs * int(np.ceil(len(tr) / 64)))
    model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", ["accuracy"])
    t0 = time.time()
    model.fit(x[tr].astype("float32"), y[tr], validation_data=(x[va].astype("float32"), y[va]),
              epochs=args.epochs, batch_size=64, verbose=2)
    held_out = float(model.evaluate(x[va].astype("float32"), y[va], verbose=0)[1])
    print(f"pretraining on digits 0-4: held-out accuracy {held_out:.4f} ({time.time() - t0:.0f}s)")

    out = Path(args.out)
    with atomic_path(out, suffix=".weights.h5") as tmp:
        base.save_weights(str(tmp))
    pre = head_accuracy(str(out), args.seed, args.head_epochs)
    rnd = head_accuracy(None, args.seed, args.head_epochs)
    print(f"transfer check on digits 5-9 (frozen features, same head): pretrained {pre:.4f} vs random {rnd:.4f}")
    write_json(out.with_name(out.name.replace(".weights.h5", ".json")), {
        "backbone": "mobilenet_v2", "alpha": DEMO_ALPHA, "image_size": args.size,
        "pretrain_data": f"sklearn load_digits, digits {list(PRETRAIN_DIGITS)}, {args.copies} renderings each, "
                         f"classes = (digit, rotation in 0/90/180/270)",
        "pretrain_images": int(len(tr)), "epochs": args.epochs, "seed": args.seed,
        "pretrain_held_out_accuracy": held_out,
        "transfer_check": {"task": f"digits {list(DEMO_DIGITS)}", "head_epochs": args.head_epochs,
                           "pretrained_val_accuracy": pre, "random_val_accuracy": rnd},
        "tensorflow": tf.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": "python tools/pretrain_demo_backbone.py " + " ".join(argv or sys.argv[1:]),
    })
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if pre < rnd + 0.15:
        print("WARNING: pretrained features are not clearly better than random ones", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
