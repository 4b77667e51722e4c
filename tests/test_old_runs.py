"""Run directories made before a change of edgeft's layout keep working.

tests/data/old_run/ was written by edgeft's flat layout (before issue 18's sub-packages, see its
make.py): a model.keras whose config names edgeft's layer by module (`edgeft.layers`) and
registered name (`edgeft>Preprocess`), and the QAT weights `edgeft qat` saves beside it.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

OLD = Path(__file__).resolve().parent / "data" / "old_run"


def test_the_old_model_records_edgeft_layers():
    config = json.loads(zipfile.ZipFile(OLD / "model.keras").read("config.json"))
    pre = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Preprocess")
    assert (pre["module"], pre["registered_name"]) == ("edgeft.layers", "edgeft>Preprocess")


def test_an_old_model_keras_loads_with_edgeft_and_with_plain_tf_keras():
    import edgeft
    from edgeft._keras import keras

    x, want = np.load(OLD / "inputs.npy"), np.load(OLD / "probs.npy")
    model = edgeft.load_model(OLD / "model.keras")
    assert np.allclose(model.predict(x, verbose=0), want, atol=1e-6)
    import edgeft.layers  # noqa: F401 - what README tells plain tf_keras users to import

    plain = keras.models.load_model(OLD / "model.keras", safe_mode=True, compile=False)
    assert np.allclose(plain.predict(x, verbose=0), want, atol=1e-6)


def test_old_qat_weights_load_into_the_qat_model(tmp_path):
    from edgeft.quantize.qat import load_qat_model

    for name in ("model.keras", "model_qat.weights.h5", "model_qat.json"):
        shutil.copy2(OLD / name, tmp_path / name)
    qat = load_qat_model(tmp_path)
    x, want = np.load(OLD / "inputs.npy"), np.load(OLD / "qat_probs.npy")
    assert np.allclose(qat.predict(x, verbose=0), want, atol=1e-5)
