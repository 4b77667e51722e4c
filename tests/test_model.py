"""The flat model, the backbone registry, layer selection for stage 2, weights files."""
import os
import subprocess
import sys

import numpy as np
import pytest

from edgeft._keras import keras
from edgeft.core import registry
from edgeft.core.config import ModelConfig
from edgeft.core.errors import UserError
from edgeft.layers import Preprocess
from edgeft.nn.model import (backbone_layers, build_model, freeze_backbone, head_layers, is_batchnorm,
                          load_model, select_unfreeze, unfreeze_top)

TINY = ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights="none", dense=16)


@pytest.fixture(scope="module")
def tiny():
    return build_model(TINY, 32, 3)


def test_model_is_flat_with_preprocessing_inside(tiny):
    assert not any(isinstance(layer, keras.Model) for layer in tiny.layers)  # QAT needs this
    assert isinstance(tiny.layers[1], Preprocess)
    assert [layer.name for layer in head_layers(tiny)] == ["head_gap", "head_dense", "head_dropout", "predictions"]
    assert tiny.input.dtype == "float32" and tuple(tiny.input.shape) == (None, 32, 32, 3)
    probs = tiny.predict(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32"), verbose=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_seed_recipe_head():
    cfg = ModelConfig(backbone="mobilenet", alpha=0.25, weights="none", head="flatten", dense=256, dropout=0.5)
    m = build_model(cfg, 32, 4)
    kinds = [type(layer).__name__ for layer in head_layers(m)]
    assert kinds == ["Flatten", "Dense", "Dropout", "Dense"]
    assert head_layers(m)[1].units == 256 and head_layers(m)[2].rate == 0.5
    assert head_layers(m)[-1].get_config()["activation"] == "softmax"


@pytest.mark.parametrize("mode, fn", [("tf", "mobilenet_v2"), ("caffe", "vgg16"), ("torch", "densenet")])
def test_preprocess_matches_keras_preprocess_input(mode, fn):
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = getattr(keras.applications, fn).preprocess_input(x.copy())
    np.testing.assert_allclose(Preprocess(mode)(x).numpy(), expected, rtol=1e-5, atol=1e-4)


# Loading ResNet50 / InceptionV3 back takes 17 s / 43 s on 2 cores: their configs (and that of
# MobileNetV3Large, whose TFOpLambda layers MobileNetV3Small shares) are checked as saving writes
# them; the others are saved and loaded whole through `load_model`.
CONFIG_CHECK_ONLY = ("resnet50", "inception_v3", "mobilenet_v3_large")


@pytest.mark.slow   # builds and loads every backbone
def test_every_registered_backbone_builds_flat_and_loads_through_the_config_check(tmp_path):
    """Every backbone builds flat, and passes the .keras config check (edgeft/nn/keras_config.py:
    MobileNetV3's TFOpLambda layers too) and loads."""
    from edgeft.nn.keras_config import config_problem

    for name in registry.names():
        bb = registry.get_backbone(name)
        size = max(bb.min_size, 75 if name == "inception_v3" else 32)
        m = build_model(ModelConfig(backbone=name, alpha=min(bb.alphas) if bb.alphas else None,
                                    weights="none", dense=0, dropout=0.0), size, 2)
        assert not any(isinstance(layer, keras.Model) for layer in m.layers), name
        assert len(backbone_layers(m)) > 10, name
        assert config_problem(keras.saving.serialize_keras_object(m)) is None, name   # what config.json holds
        if name not in CONFIG_CHECK_ONLY:
            m.save(tmp_path / f"{name}.keras")
            assert load_model(tmp_path / f"{name}.keras").output_shape[-1] == 2, name
            (tmp_path / f"{name}.keras").unlink()


@pytest.mark.parametrize("spec, first, count", [("3", "Conv_1", 3), ("block_16_expand", "block_16_expand", None),
                                                 ("block_16", "block_16_expand", None), ("0.1", None, 16)])
def test_select_unfreeze(tiny, spec, first, count):
    chosen = select_unfreeze(tiny, spec)
    names = [layer.name for layer in backbone_layers(tiny)]
    assert chosen == names[len(names) - len(chosen):]   # always a top slice of the backbone
    if first:
        assert chosen[0] == first
    if count:
        assert len(chosen) == count


def test_select_unfreeze_rejects_unknown_names(tiny):
    with pytest.raises(UserError, match="not a layer or block"):
        select_unfreeze(tiny, "block99_conv")
    with pytest.raises(UserError, match="fraction"):
        select_unfreeze(tiny, "1.5")


def test_stage2_trains_chosen_layers_and_never_batchnorm(tiny):
    trained = unfreeze_top(tiny, "block_15")
    bn = [layer for layer in backbone_layers(tiny) if is_batchnorm(layer)]
    assert bn and not any(layer.trainable for layer in bn)
    chosen = set(select_unfreeze(tiny, "block_15"))
    for layer in backbone_layers(tiny):
        assert layer.trainable == (layer.name in chosen and not is_batchnorm(layer)), layer.name
    assert trained and all(name.startswith(("block_15", "block_16", "Conv_1")) for name in trained)
    assert all(layer.trainable for layer in head_layers(tiny))
    freeze_backbone(tiny)
    assert not any(layer.trainable for layer in backbone_layers(tiny))
    # the trainable variables keras optimises are exactly the head's
    head_vars = {id(v) for layer in head_layers(tiny) for v in layer.trainable_weights}
    assert {id(v) for v in tiny.trainable_weights} == head_vars


def test_weights_path_round_trip(tmp_path):
    src = build_model(TINY, 32, 3)
    base_layers = backbone_layers(src)
    rng = np.random.default_rng(0)
    for layer in base_layers:  # give the backbone recognisable, non-initial weights
        layer.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in layer.get_weights()])
    backbone = keras.Model(src.input, head_layers(src)[0].input)
    path = tmp_path / "backbone.weights.h5"
    backbone.save_weights(str(path))
    loaded = build_model(ModelConfig(**{**TINY.__dict__, "weights": str(path)}), 32, 3)
    for a, b in zip(base_layers, backbone_layers(loaded)):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)


def test_bad_weights_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_model(ModelConfig(**{**TINY.__dict__, "weights": str(tmp_path / "nope.h5")}), 32, 3)
    other = build_model(ModelConfig(backbone="mobilenet", alpha=0.25, weights="none"), 32, 3)
    path = tmp_path / "other.weights.h5"
    keras.Model(other.input, head_layers(other)[0].input).save_weights(str(path))
    with pytest.raises(UserError, match="does not fit"):
        build_model(ModelConfig(**{**TINY.__dict__, "weights": str(path)}), 32, 3)


def test_keras_file_loads_with_safe_mode(tiny, tmp_path):
    path = tmp_path / "m.keras"
    tiny.save(path)
    again = load_model(path)
    x = np.full((1, 32, 32, 3), 100.0, np.float32)
    np.testing.assert_allclose(again.predict(x, verbose=0), tiny.predict(x, verbose=0), atol=1e-6)


def test_imagenet_download_failure_is_one_line_error(tmp_path):
    """No cached weights and no reachable network: the real `weights=imagenet` path must say what
    to do instead (this holds on a machine with internet too: the proxy points at a closed port)."""
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    code = ("from edgeft.core.config import ModelConfig\nfrom edgeft.nn.model import build_model\n"
            "from edgeft.core.errors import UserError\n"
            "try:\n    build_model(ModelConfig(backbone='mobilenet_v2', alpha=0.35), 96, 2)\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "USERERROR" in r.stdout, r.stderr[-2000:]
    assert "--weights PATH" in r.stdout


@pytest.mark.slow   # 30 s: a mixed-precision model built, saved and loaded
def test_a_mixed_precision_model_is_saved_as_float32(tmp_path):
    """--mixed-precision trains float16 layers; model.keras must hold float32 ones with the same
    weights, or no TFLite file can be made from it (TFLite has no float16 Conv2D)."""
    from edgeft._keras import keras, tf
    from edgeft.nn.model import as_float32, float32_policy

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_model(ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights="none", dense=8), 32, 3)
        with float32_policy():
            assert keras.mixed_precision.global_policy().name == "float32"
        assert keras.mixed_precision.global_policy().name == "mixed_float16"   # restored
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert {layer.dtype_policy.name for layer in mixed.layers} >= {"mixed_float16"}
    plain = as_float32(mixed)
    assert {layer.dtype_policy.name for layer in plain.layers} == {"float32"}
    assert as_float32(plain) is plain
    for a, b in zip(mixed.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(plain.predict(x, verbose=0), mixed.predict(x, verbose=0), atol=2e-2)
    plain.save(str(tmp_path / "m.keras"))
    loaded = load_model(tmp_path / "m.keras")
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}
    assert tf.lite.TFLiteConverter.from_keras_model(loaded).convert()[4:8] == b"TFL3"
