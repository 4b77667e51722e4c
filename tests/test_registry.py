"""Every registered backbone, one conformance suite (keras-hub's run_vision_backbone_test): its row
owns its blocks, preprocessing, sizes and QAT claim, and each claim is checked on the built model."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgeft.core import registry
from edgeft.core.config import ModelConfig
from edgeft.core.registry import PREPROCESSING, get_backbone


def tiny_model(name: str, classes: int = 2):
    from edgeft.nn.model import build_model, set_seed

    set_seed(0)   # random weights, the same every run

    bb = get_backbone(name)
    cfg = ModelConfig(backbone=name, alpha=min(bb.alphas) if bb.alphas else None, weights="none", dense=0,
                      dropout=0.0)
    return build_model(cfg, bb.min_size, classes)


def test_every_row_states_its_structure():
    """TF-free: preprocessing with an exact 8-bit form or a note of its error, sizes, block rules."""
    for name in registry.names():
        bb = get_backbone(name)
        pre = bb.preprocessing
        assert pre.exact8 or pre.note, name
        assert bb.min_size <= bb.default_size <= bb.max_size, name
        assert bb.blocks or bb.block_end, name
        assert bool(bb.constructor) != bool(bb.builder), name
        assert bb.qat or bb.qat_note, name
        for _, sizes in bb.imagenet:
            assert all(bb.min_size <= s <= bb.max_size for s in sizes), name
    assert [get_backbone(f"efficientnet_lite{n}").default_size for n in range(5)] == [224, 240, 260, 280, 300]
    assert [registry.imagenet_sizes(get_backbone(f"efficientnet_lite{n}"), None) for n in range(5)] == \
        [None, None, None, (), ()]


def test_exact_preprocessing_is_exact_in_8_bits():
    """A row that claims an exact 8-bit form: QAT's form of its Preprocess layer equals the float
    layer on every pixel value (to float rounding), and every output is on the 8-bit grid of its
    fixed output range (what the int8 file's input path holds)."""
    from edgeft.layers import Preprocess, preprocess_output_range

    x = np.arange(256, dtype=np.float32).reshape(1, 1, 256, 1).repeat(3, axis=-1)
    for key, pre in PREPROCESSING.items():
        if not pre.exact8:
            continue
        layer = Preprocess(**pre.layer_kwargs())
        q = layer.qat_form()
        got, ref = q(x).numpy(), layer(x).numpy()
        lo, hi = preprocess_output_range(q.mode, q.mean, q.std)
        scale = (hi - lo) / 255.0
        levels = (got - lo) / scale
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3, err_msg=key)   # on the grid
        assert np.abs(got - ref).max() <= (1 / 128 + 1e-6 if key == "tf" else 1e-6), key


@pytest.mark.parametrize("name", registry.names())
def test_blocks_of_every_backbone(name):
    """More than 3 blocks, every backbone layer in exactly one (in order), and blocks:0.3 takes
    whole top blocks covering 30 % of the layers, at most one block more."""
    from edgeft.nn.model import backbone_blocks, backbone_layers, model_backbone, select_unfreeze

    m = tiny_model(name)
    assert model_backbone(m).name == name
    names = [layer.name for layer in backbone_layers(m)]
    blocks = backbone_blocks(names, get_backbone(name))
    assert len(blocks) > 3, name
    assert [n for b in blocks for n in b] == names   # each layer once, in order
    chosen = select_unfreeze(m, "blocks:0.3")
    want = math.ceil(0.3 * len(names))
    k = next(k for k in range(1, len(blocks) + 1) if sum(map(len, blocks[-k:])) >= want)
    assert chosen == [n for b in blocks[-k:] for n in b]
    assert want <= len(chosen) < want + len(blocks[-k]), (name, len(chosen), want)
    assert len(chosen) < len(names)   # never everything


@pytest.mark.slow   # a QAT model built and converted per row (VGG16, ResNet50, InceptionV3: tens of seconds each)
@pytest.mark.parametrize("name", [n for n in registry.names() if get_backbone(n).qat])
def test_every_qat_row_converts_to_int8_and_runs_in_litert(name):
    """A row that claims QAT: its QAT model is built, calibrated, converted to an int8 TFLite file
    that takes raw pixels at scale 1 with the trained ranges, and runs in LiteRT on 2 images."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeft.export.keras2tflite import tflite_int8
    from edgeft.layers import preprocess_output_range
    from edgeft.quantize.qat import build_qat_model

    m = tiny_model(name, 3)
    size = m.input_shape[1]
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    qat = build_qat_model(m)   # tfmot's starting ranges: a valid file, not a calibrated one (cheaper)
    data = tflite_int8(qat, images)
    interp = Interpreter(model_content=data)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert inp["quantization"] == (1.0, 0), name   # raw pixels 0-255, exact
    pre = qat.get_layer("quant_preprocess").layer
    lo, hi = preprocess_output_range(pre.mode, pre.mean, pre.std)
    scales = {float(t["quantization_parameters"]["scales"][0]) for t in interp.get_tensor_details()
              if "preprocess" in t["name"] and len(t["quantization_parameters"]["scales"]) == 1}
    # the Preprocess output keeps its fixed range in the file (random weights leave deeper ranges
    # near zero, so the trained-range check of tests/test_qat.py runs on a trained model instead)
    want = (hi - lo) / 255.0
    assert any(abs(s - want) <= 1e-6 * want for s in scales), (name, want, scales)
    probs = []
    for img in images:
        interp.set_tensor(inp["index"], img[None].astype(inp["dtype"]))
        interp.invoke()
        scale, zero = out["quantization"]
        probs.append((interp.get_tensor(out["index"]).astype(np.float32) - zero) * scale)
    probs = np.concatenate(probs)
    assert probs.shape == (2, 3) and np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=0.02)
    # the file computes what the QAT model simulates: same top-1, probabilities close (random
    # weights with tfmot's starting ranges: measured up to 0.10 apart on ResNet50 over 3 seeds)
    keras_probs = qat(images, training=False).numpy()
    assert list(probs.argmax(-1)) == list(keras_probs.argmax(-1)), (name, probs, keras_probs)
    assert np.abs(probs - keras_probs).max() < 0.2, (name, probs, keras_probs)


def test_qat_claims_read_from_the_row():
    from edgeft.core.config import build_config
    from edgeft.quantize.qat import qat_supported

    for name in registry.names():
        ok, note = qat_supported(build_config({"backbone": name, "weights": "none"}))
        assert ok == get_backbone(name).qat and (ok or "PTQ" in note), name
