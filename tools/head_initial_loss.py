#!/usr/bin/env python
"""Where stage 1's loss starts: the new head's initial loss on a folder's real backbone features.

    python tools/head_initial_loss.py FOLDER --backbone efficientnet_lite0 --weights imagenet --size 128
    python tools/head_initial_loss.py FOLDER --backbone mobilenet_v2 --alpha 0.35 --weights W.h5 --size 64

Issue 27 saw stage 1's loss start near 9 on digits through a MobileNetV2 pretrained at 64 px
(ln 10 = 2.3 for 10 classes). A softmax head's loss at its first step is set by its initial logits:
GAP features (as edgeft's default head pools them) times Keras' glorot_uniform kernel (zero bias).
This prints the features' scale and the initial cross-entropy over --inits initialisations, beside
ln K: a start near 9 needs logits with a spread near 10, i.e. features far larger than these.
Dev-machine script (TensorFlow); prints a table and, with --json, writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def initial_losses(g: np.ndarray, y: np.ndarray, k: int, inits: int) -> list[float]:
    from edgeft._keras import keras

    out = []
    for s in range(inits):
        z = g @ keras.initializers.GlorotUniform(seed=s)((g.shape[1], k)).numpy()
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        out.append(float(-logp[np.arange(len(y)), y].mean()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("folder")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--alpha", type=float)
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--inits", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    from edgeft.core.config import build_config
    from edgeft.data.datasets import load_splits
    from edgeft.nn.model import build_model, feature_extractor

    cfg = build_config({"backbone": a.backbone, "alpha": a.alpha, "weights": a.weights, "image_size": a.size})
    splits = load_splits(a.folder, a.size, 0.1, seed=0)
    k = len(splits.classes)
    f = feature_extractor(build_model(cfg.model, a.size, k)).predict(splits.train.x.astype("float32"), batch_size=64,
                                                                     verbose=0)
    g = f.reshape(len(f), -1, f.shape[-1]).mean(1)
    losses = initial_losses(g, splits.train.y, k, a.inits)
    r = {"folder": a.folder, "backbone": a.backbone, "alpha": a.alpha, "weights": a.weights, "size": a.size,
         "images": len(g), "features": int(g.shape[1]), "rms_feature": float(np.sqrt((g ** 2).mean())),
         "feature_norm": float(np.linalg.norm(g, axis=1).mean()), "initial_loss_mean": float(np.mean(losses)),
         "initial_loss_min": float(np.min(losses)), "initial_loss_max": float(np.max(losses)), "ln_k": float(np.log(k))}
    print(f"{'features':>8} {'rms':>7} {'norm':>7} {'initial loss (min-max)':>24} {'ln K':>6}")
    print(f"{r['features']:>8} {r['rms_feature']:>7.3f} {r['feature_norm']:>7.2f} "
          f"{r['initial_loss_mean']:>9.3f} ({r['initial_loss_min']:.2f}-{r['initial_loss_max']:.2f}) {r['ln_k']:>6.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
