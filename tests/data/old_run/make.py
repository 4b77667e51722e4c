"""Wrote the files beside this one, with edgeft's FLAT layout (commit 1861800, before issue 18's
sub-packages): a minimal edgeft model (input -> Preprocess -> conv -> pooling -> softmax),
saved as model.keras, and its QAT weights (model_qat.weights.h5 + model_qat.json) as `edgeft qat`
saves them. tests/test_old_runs.py loads them with whatever layout the package has now. Kept to
show how they were made; run again only to regenerate them (then they are no longer old).

    TF_USE_LEGACY_KERAS=1 python tests/data/old_run/make.py
"""
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from edgeft._keras import keras  # noqa: E402
from edgeft.layers import Preprocess  # noqa: E402
from edgeft.quantize.qat import build_qat_model  # noqa: E402

keras.utils.set_random_seed(0)
inp = keras.Input((8, 8, 3), name="input")
x = Preprocess("tf", name="preprocess")(inp)
x = keras.layers.Conv2D(4, 3, name="conv")(x)
x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
model = keras.Model(inp, out)
model.save(str(HERE / "model.keras"))
qat = build_qat_model(model, "per-channel")
qat.save_weights(str(HERE / "model_qat.weights.h5"))
(HERE / "model_qat.json").write_text(json.dumps({"granularity": "per-channel", "epochs": 1}) + "\n")
import numpy as np  # noqa: E402
x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype("float32")
np.save(HERE / "inputs.npy", x)
np.save(HERE / "probs.npy", model.predict(x, verbose=0))
np.save(HERE / "qat_probs.npy", qat.predict(x, verbose=0))
print("wrote", sorted(p.name for p in HERE.iterdir()))
