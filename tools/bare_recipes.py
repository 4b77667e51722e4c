"""Bare tf_keras fine-tuning scripts, no edgeft code: what tools/bench_recipe.py measures edgeft against.

    python tools/bare_recipes.py seed  TRAIN_DIR TEST_DIR --weights W.h5 --size 64 --seed 1
    python tools/bare_recipes.py guide TRAIN_DIR TEST_DIR --weights W.h5 --size 64 --seed 1

seed:  the seed script's recipe: frozen MobileNetV2 -> Flatten -> Dense 256 relu -> Dropout 0.5 ->
       softmax, Adam 1e-4 for 10 epochs; then the top 30 % of the backbone's layers (BatchNorm kept
       frozen) at Adam 1e-5 with cosine decay for 10 epochs, early stopping (patience 3, best
       weights restored).
guide: the Keras transfer-learning guide: frozen base (training=False) -> GAP -> Dropout 0.2 ->
       softmax, Adam 1e-3 for 8 epochs; then the top 30 layers (BatchNorm frozen) at Adam 1e-5 for 4.

Both hold out 20 % of TRAIN_DIR for validation (seeded), as edgeft does, and print one JSON line
with the accuracy and balanced accuracy on TEST_DIR and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402


def load(folder: str, size: int, seed: int, subset: str | None):
    kw = dict(validation_split=0.2, subset=subset, seed=seed) if subset else dict(shuffle=False)
    return keras.utils.image_dataset_from_directory(folder, image_size=(size, size), batch_size=32,
                                                    label_mode="int", **kw)


def backbone(size: int, alpha: float, weights: str):
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None)
    base.load_weights(weights)
    return base


def build(recipe: str, base, n_classes: int, size: int):
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    if recipe == "seed":
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(256, activation="relu")(x)
        x = keras.layers.Dropout(0.5)(x)
    else:
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(x))


def unfreeze(base, n_top: int) -> None:
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= len(base.layers) - n_top and not isinstance(layer, keras.layers.BatchNormalization)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", choices=("seed", "guide"))
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--alpha", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    t0 = time.time()
    keras.utils.set_random_seed(a.seed)
    train, val = load(a.train, a.size, a.seed, "training"), load(a.train, a.size, a.seed, "validation")
    test = load(a.test, a.size, a.seed, None)
    n_classes = len(train.class_names)
    base = backbone(a.size, a.alpha, a.weights)
    model = build(a.recipe, base, n_classes, a.size)
    loss = "sparse_categorical_crossentropy"
    if a.recipe == "seed":
        model.compile(keras.optimizers.Adam(1e-4), loss, ["accuracy"])
        model.fit(train, validation_data=val, epochs=10, verbose=0)
        unfreeze(base, int(np.ceil(0.3 * len(base.layers))))
        steps = 10 * int(train.cardinality())
        model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-5, steps)), loss, ["accuracy"])
        model.fit(train, validation_data=val, epochs=10, verbose=0,
                  callbacks=[keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)])
    else:
        model.compile(keras.optimizers.Adam(1e-3), loss, ["accuracy"])
        model.fit(train, validation_data=val, epochs=8, verbose=0)
        unfreeze(base, 30)
        model.compile(keras.optimizers.Adam(1e-5), loss, ["accuracy"])
        model.fit(train, validation_data=val, epochs=4, verbose=0)
    y = np.concatenate([b.numpy() for _, b in test])
    pred = model.predict(test, verbose=0).argmax(-1)
    per_class = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    print(json.dumps({"accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(per_class)),
                      "n_test": int(len(y)), "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
