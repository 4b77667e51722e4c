"""Issue 30 item 4(b): BatchNorm folding, cross-layer equalization and bias correction
(edgeft.quantize.equalize) on tiny Keras models, and the per-tensor recovery candidate that uses them."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


def _tiny(relu6: bool = False, seed: int = 0):
    """conv -> BN -> act -> pad -> depthwise -> BN -> act -> conv -> BN -> act -> pool -> dense, with
    BatchNorm statistics far from identity and conv1's channels of very different ranges (what
    makes per-tensor weights fail)."""
    from edgeft._keras import keras

    keras.utils.set_random_seed(seed)
    act = (lambda n: keras.layers.ReLU(6.0, name=n)) if relu6 else (lambda n: keras.layers.ReLU(name=n))
    x = inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    x = act("a1")(keras.layers.BatchNormalization(name="bn1")(x))
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False, name="dw")(x)
    x = act("a2")(keras.layers.BatchNormalization(name="bn2")(x))
    x = keras.layers.Conv2D(6, 1, use_bias=False, name="c2")(x)
    x = act("a3")(keras.layers.BatchNormalization(name="bn3")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="fc")(x))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.2, 3, n), rng.normal(0, .5, n), rng.normal(0, .5, n), rng.uniform(.1, 4, n)])
    k = model.get_layer("c1").get_weights()[0]
    k[..., 0] *= 30
    k[..., 1] *= 0.03
    model.get_layer("c1").set_weights([k])
    return model


def _x(n=16, seed=1, scale=1.0):
    return (np.random.default_rng(seed).uniform(-1, 1, (n, 12, 12, 3)) * scale).astype(np.float32)


def _ranges(model, a, b):
    from edgeft.quantize import equalize as eq

    la, lb = model.get_layer(a), model.get_layer(b)
    return (eq._out_ranges(eq.KINDS[type(la).__name__], la.get_weights()[0]),
            eq._in_ranges(eq.KINDS[type(lb).__name__], lb.get_weights()[0]))


def test_batchnorm_folding_keeps_the_outputs():
    from edgeft.quantize.equalize import fold_batchnorm

    model, x = _tiny(), _x()
    folded = fold_batchnorm(model)
    assert not [layer for layer in folded.layers if type(layer).__name__ == "BatchNormalization"]
    assert folded.get_layer("c1").use_bias and model.get_layer("c1").get_weights()[0].shape == \
        folded.get_layer("c1").get_weights()[0].shape
    assert np.abs(folded(x).numpy() - model(x).numpy()).max() <= 1e-5
    assert len(model.get_layer("bn1").get_weights()) == 4   # the original is untouched


def test_equalization_keeps_float_outputs_with_relu_and_equalizes_the_pairs():
    from edgeft.quantize.equalize import equalize, fold_batchnorm

    model, x = _tiny(), _x()
    eqd, pairs = equalize(model)
    assert [(a, b) for a, b, *_ in pairs] == [("c1", "dw"), ("dw", "c2"), ("c2", "fc")]
    assert np.abs(eqd(x).numpy() - model(x).numpy()).max() <= 1e-5
    r1, r2 = _ranges(eqd, "c2", "fc")   # the last pair of a sweep: equal exactly
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    before = fold_batchnorm(model).get_layer("c1").get_weights()[0]
    after = eqd.get_layer("c1").get_weights()[0]
    spread = [np.abs(k).max(axis=(0, 1, 2)).max() / np.abs(k).max(axis=(0, 1, 2)).min() for k in (before, after)]
    assert spread[1] < spread[0] / 20, spread   # c1's channels no longer span 1000x
    r1, r2 = _ranges(eqd, "c1", "dw")   # in a chain: near, after a few sweeps
    np.testing.assert_allclose(r1, r2, rtol=0.1)


def test_relu6_options():
    """replace: the scaled pairs' ReLU6 become ReLU (same outputs while no activation passes 6); skip:
    nothing equalized (every pair goes through ReLU6); keep: scaled with the clip at 6 (moved: differs)."""
    from edgeft.quantize.equalize import equalize

    model, small = _tiny(relu6=True), _x(scale=0.01)
    rep, pairs = equalize(model, "replace")
    assert pairs and {type(rep.get_layer(n)).__name__ for n in ("a1", "a2", "a3")} == {"ReLU"}
    assert all(rep.get_layer(n).get_config()["max_value"] is None for n in ("a1", "a2", "a3"))
    assert np.abs(rep(small).numpy() - model(small).numpy()).max() <= 1e-5
    skip, none = equalize(model, "skip")
    assert none == [] and skip.get_layer("a1").get_config()["max_value"] == 6.0
    big = _x(scale=300)
    kept, _ = equalize(model, "keep")
    assert np.abs(kept(big).numpy() - model(big).numpy()).max() > 1e-3
    with pytest.raises(ValueError, match="relu6"):
        equalize(model, "clip")


def test_relu6_clamp_keeps_the_outputs_on_its_images_and_the_saturated_channels():
    """clamp: a channel whose ReLU6 input reaches 6 on the images keeps its scale; the others scale
    no lower than their largest input / 6; so the outputs on those images stay the same."""
    from edgeft.quantize.equalize import equalize, fold_batchnorm, relu6_bounds

    model, x = _tiny(relu6=True), _x(scale=3)
    clamped, pairs = equalize(model, "clamp", images=x)
    assert np.abs(clamped(x).numpy() - model(x).numpy()).max() <= 1e-5
    _, fixed = relu6_bounds(model, pairs, x)["c1"]
    assert fixed.any() and (~fixed).any()   # the test's images saturate some of c1's channels, not all
    k0 = np.abs(fold_batchnorm(model).get_layer("c1").get_weights()[0]).max(axis=(0, 1, 2))
    k1 = np.abs(clamped.get_layer("c1").get_weights()[0]).max(axis=(0, 1, 2))
    np.testing.assert_allclose(k1[fixed], k0[fixed], rtol=1e-6)
    assert not np.allclose(k1[~fixed], k0[~fixed], rtol=1e-3)   # the others were equalized
    with pytest.raises(ValueError, match="calibration images"):
        equalize(model, "clamp")


def test_bias_correction_removes_the_mean_shift_of_per_tensor_weights():
    from edgeft._keras import keras
    from edgeft.quantize.equalize import correct_biases, per_tensor_int8

    keras.utils.set_random_seed(3)
    x = inp = keras.Input((8, 8, 4))
    model = keras.Model(inp, keras.layers.Conv2D(6, 3, padding="same", name="c")(x))
    k, b = model.get_layer("c").get_weights()
    k[..., 0] *= 40   # one wide channel: the per-tensor scale rounds the others coarsely
    model.get_layer("c").set_weights([k, b])
    rng = np.random.default_rng(0)
    calib, fresh = (rng.uniform(0, 1, (32, 8, 8, 4)).astype(np.float32) for _ in range(2))   # inputs with a mean

    def shift(m, xs):   # mean output of the per-tensor-quantized layer minus the float model's
        q = keras.models.clone_model(m)
        kq, bq = m.get_layer("c").get_weights()
        q.get_layer("c").set_weights([per_tensor_int8(kq.astype(np.float64)).astype(np.float32), bq])
        return np.abs((q(xs).numpy() - model(xs).numpy()).mean(axis=(0, 1, 2)))

    corrected = keras.models.clone_model(model)
    corrected.set_weights(model.get_weights())
    removed = correct_biases(corrected, calib)
    assert removed["c"] > 0
    naive, fixed = shift(model, fresh), shift(corrected, fresh)
    assert fixed.max() < 0.2 * naive.max(), (naive, fixed)


def _ctx(granularity, model=None, rep=None):
    from edgeft.core.config import build_config

    cfg = build_config({"int8_granularity": granularity})
    rep = np.zeros((4, 12, 12, 3), np.float32) if rep is None else rep
    return SimpleNamespace(cfg=cfg, train_split=SimpleNamespace(y=np.zeros(100)), rep_images=rep, qat_model=None,
                           model=model, metadata=False, labels=["a", "b", "c"])


def test_per_tensor_recovery_tries_equalization_first_and_builds_a_per_tensor_file(monkeypatch):
    from edgeft.export.keras2tflite import per_channel_tensors
    from edgeft.pipeline import recovery

    pure, _, skipped = recovery._candidates(_ctx("per-tensor"), "tflite_int8", "auto", None)
    assert pure[0].step == "equalization" and "equalization" not in skipped
    assert [c.step for c in pure[1:]] == ["calibration"] * (len(pure) - 1)
    pure, _, skipped = recovery._candidates(_ctx("per-channel"), "tflite_int8", "auto", None)
    assert all(c.step != "equalization" for c in pure) and "per-tensor files only" in skipped["equalization"]
    pure, _, skipped = recovery._candidates(_ctx("per-tensor"), "onnx_int8", "auto", None)
    assert all(c.step != "equalization" for c in pure) and "per-channel weights" in skipped["equalization"]

    model = _tiny(relu6=True)
    rep = (np.random.default_rng(0).uniform(0, 255, (8, 12, 12, 3)) / 255).astype(np.float32)
    cand = recovery._candidates(_ctx("per-tensor"), "tflite_int8", "auto", None)[0][0]
    data = recovery._builder(_ctx("per-tensor", model, rep), "tflite_int8")(cand)
    assert per_channel_tensors(data) == []   # the per-tensor check of tflite_int8 held on the equalized model
    from edgeft.quantize.int8_choice import tflite_probs

    assert tflite_probs(data, rep).shape == (8, 3)
