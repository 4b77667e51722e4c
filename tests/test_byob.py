"""Bring your own backbone (`--backbone FILE.keras|.h5`): refusals (one line, exit 2, before any
training; the TF-free ones before TensorFlow is imported), the flat rebuild, blocks, QAT or PTQ,
and one run end to end that needs the file no more after finetune."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_digit_folder
from edgeft._keras import keras

SCRIPT = REPO / "tools" / "edgeft_device.py"


def residual_backbone(size: int | None = 32, classifier: bool = False, vector: bool = False, seed: int = 0):
    """Conv / BatchNorm / ReLU with two residual Adds and two stride-2 convolutions; `classifier`
    adds a Dense top (its feature layer is `features`); `vector` ends at a GAP."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="stem_conv")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for i in (1, 2):
        r = x
        x = keras.layers.Conv2D(16, 3, padding="same", name=f"b{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"b{i}_bn")(x)
        x = keras.layers.ReLU(name=f"b{i}_relu")(x)
        x = keras.layers.Add(name=f"b{i}_add")([x, r])
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="top_conv")(x)
    x = keras.layers.ReLU(name="features")(x)
    if classifier or vector:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if classifier:   # named as edgeft's own output layer: renamed inside edgeft's model
        x = keras.layers.Dense(10, activation="softmax", name="predictions")(x)
    return keras.Model(inp, x, name="mynet")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("byob")
    m = residual_backbone()
    m.save(d / "bb.keras")
    m.save(d / "bb.h5")
    residual_backbone(classifier=True).save(d / "classifier.keras")
    residual_backbone(size=None).save(d / "anysize.keras")
    inner = residual_backbone(vector=True)
    inp = keras.Input((32, 32, 3))
    keras.Model(inp, keras.layers.Dense(8, name="proj")(inner(inp))).save(d / "nested.keras")
    inp = keras.Input((32, 32, 3))   # stride / pooling only, and a layer tfmot's QAT does not take
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c1")(inp)
    x = keras.layers.LayerNormalization(name="ln")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    keras.Model(inp, x).save(d / "plain.keras")
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, name="c1")(inp)
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 2, name="double")(x)).save(d / "lambda.keras")
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 2, name="double")(x)).save(d / "lambda.h5")

    class Scale(keras.layers.Layer):
        def call(self, t):
            return t * 2

    keras.Model(inp, Scale(name="scale")(x)).save(d / "custom.keras")
    keras.Model(inp, Scale(name="scale")(x)).save(d / "custom.h5")
    return d


def _cli(args, cwd) -> subprocess.CompletedProcess:
    """edgeft in a fresh process; prints whether TensorFlow got imported before it returned."""
    code = ("import sys\nfrom edgeft.cli.app import main\nrc = main(sys.argv[1:])\n"
            "print('TF_IMPORTED' if 'tensorflow' in sys.modules else 'TF_NOT_IMPORTED')\nsys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def _error_line(done) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("edgeft: error:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.mark.parametrize("extra, needle", [
    (["--backbone", "{d}/bb.keras", "--preprocess", "scale=1/255,offst=0"], "unknown key 'offst'"),
    (["--backbone", "{d}/bb.keras", "--preprocess", "mean=1,2,std=3"], "mean takes 1 or 3 values"),
    (["--backbone", "{d}/bb.keras"], "needs --preprocess"),
    (["--backbone", "{d}/missing.keras", "--preprocess", "none"], "--backbone file not found"),
    (["--backbone", "{d}/bb.onnx", "--preprocess", "none"], "must be a Keras model saved as .keras or .h5"),
])
def test_refusals_before_tensorflow(files, tmp_path, extra, needle):
    folder = write_digit_folder(tmp_path / "digits", per_class=4)
    done = _cli(["finetune", folder, "--out", tmp_path / "run", *[e.format(d=files) for e in extra]], tmp_path)
    assert needle in _error_line(done)
    assert "TF_NOT_IMPORTED" in done.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, extra, needle", [
    ("lambda.keras", [], "a Lambda layer 'double'"),
    ("lambda.h5", [], "a Lambda layer 'double'"),
    ("custom.keras", [], "custom layer class"),
    ("custom.h5", [], "custom layer class"),
    ("bb.keras", ["--image-size", "64"], "fixed input size 32x32 differs from --image-size 64"),
    ("anysize.keras", [], "takes any input size: give --image-size"),
    ("classifier.keras", ["--backbone-output", "nope"], "--backbone-output 'nope' is not a layer"),
])
def test_refusals_before_training(files, tmp_path, name, extra, needle):
    """One line, exit 2, no run directory: refused while the file is checked, before any data or training."""
    from edgeft.cli.app import main

    folder = write_digit_folder(tmp_path / "digits", per_class=4)
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["finetune", str(folder), "--out", str(tmp_path / "run"), "--backbone", str(files / name),
                   "--preprocess", "none", "--quiet", *extra])
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("edgeft: error:")]
    assert rc == 2 and len(lines) == 1, err.getvalue()
    assert needle in lines[0]
    assert not (tmp_path / "run").exists()


def test_preprocess_forms():
    from edgeft.core.byob import parse_preprocess
    from edgeft.layers import Preprocess

    x = np.arange(256, dtype=np.float32).reshape(1, 1, 256, 1).repeat(3, axis=-1)
    for text, want in (("scale=1/127.5,offset=-1", x / 127.5 - 1), ("none", x),
                       ("mean=123.675,116.28,103.53,std=58.395,57.12,57.375",
                        (x - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375])):
        got = Preprocess(**parse_preprocess(text).layer_kwargs())(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=text)


def _model(path, **kw):
    from edgeft.core.config import ModelConfig
    from edgeft.nn.model import build_model

    return build_model(ModelConfig(backbone=str(path), preprocess=kw.pop("preprocess", "none"), dense=0, **kw), 32, 3)


@pytest.mark.parametrize("name, output", [("bb.keras", None), ("bb.h5", None), ("classifier.keras", "features")])
def test_rebuilt_flat_with_the_files_weights(files, name, output):
    from edgeft.nn.model import backbone_layers, model_blocks, select_unfreeze

    m = _model(files / name, backbone_output=output)
    assert not any(isinstance(layer, keras.Model) for layer in m.layers)   # QAT needs it flat
    assert m.name == f"edgeft_file_{Path(name).stem}"
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    src = keras.models.load_model(files / name, compile=False)
    want = keras.Model(src.input, src.get_layer("features").output).predict(x, verbose=0)
    got = keras.Model(m.input, m.get_layer("features").output).predict(x, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-5)   # preprocess none: the file's own layers, its weights
    blocks, rule = model_blocks(m)
    assert rule.startswith("merge points")
    assert [b[-1] for b in blocks[:-1]] == ["b1_add", "b2_add"] and blocks[-1] == ["top_conv", "features"]
    assert [n for b in blocks for n in b] == [layer.name for layer in backbone_layers(m)]
    assert select_unfreeze(m, "blocks:1") == ["top_conv", "features"]


def test_full_classifier_without_output_layer_keeps_its_top_renamed(files):
    m = _model(files / "classifier.keras")
    names = [layer.name for layer in m.layers]
    assert "bb_predictions" in names and names[-1] == "predictions" and "features_map" in names   # vector -> 1x1 map
    assert m.output_shape == (None, 3)


def test_nested_model_is_flattened(files):
    m = _model(files / "nested.keras")
    assert not any(isinstance(layer, keras.Model) for layer in m.layers)
    names = [layer.name for layer in m.layers]
    assert {"stem_conv", "b2_add", "pool", "proj", "features_map"} <= set(names)


def test_stride_pooling_blocks_and_qat_refusal_names_the_layer(files):
    from edgeft.core.config import build_config
    from edgeft.nn.model import model_blocks
    from edgeft.quantize.qat import qat_supported

    m = _model(files / "plain.keras")
    blocks, rule = model_blocks(m)
    assert rule.startswith("stride-2") and blocks == [["c1", "ln", "pool"], ["c2"]]
    cfg = build_config({"backbone": str(files / "plain.keras"), "preprocess": "none"})
    ok, note = qat_supported(cfg, m)
    assert not ok and "'ln' (LayerNormalization)" in note and "post-training quantization" in note
    ok, _ = qat_supported(build_config({"backbone": str(files / "bb.keras"), "preprocess": "none"}), _model(files / "bb.keras"))
    assert ok


def test_recorded_file_checked_by_sha256(files, tmp_path):
    """finetune --resume / --config RUN/config.yaml build the backbone again from the recorded file:
    refused with one line when it is missing or changed."""
    from edgeft.core import byob
    from edgeft.core.config import ModelConfig
    from edgeft.core.errors import UserError

    copy = tmp_path / "bb.keras"
    copy.write_bytes((files / "bb.keras").read_bytes())
    rec = ModelConfig(backbone=str(copy), preprocess="none")
    rec = ModelConfig(**{**rec.__dict__, **byob.recorded(rec)})
    assert rec.backbone == "file:" + byob.sha256(copy) and byob.source_file(rec)[0] == copy
    copy.write_bytes((files / "bb.h5").read_bytes())
    with pytest.raises(UserError, match="changed since the run recorded it"):
        byob.source_file(rec)
    copy.unlink()
    with pytest.raises(UserError, match="is missing"):
        byob.source_file(rec)


@pytest.mark.slow   # trains, QATs and exports a run
def test_end_to_end_without_the_file_after_finetune(files, tmp_path):
    """finetune (learns: val accuracy >= 2x chance) -> QAT -> export (gate passes) -> file deleted ->
    export --check and parity still work -> the device script verifies the golden vectors."""
    from edgeft import finetune
    from edgeft.cli.app import main
    from edgeft.core import byob

    folder = write_digit_folder(tmp_path / "digits")
    bb = tmp_path / "mine.keras"
    bb.write_bytes((files / "bb.keras").read_bytes())
    sha = byob.sha256(bb)
    run = tmp_path / "run"
    result = finetune({"folder": str(folder), "backbone": str(bb), "preprocess": "scale=1/255,offset=0",
                       "image_size": 32, "recipe": "seed", "head": "flatten", "dense": 0, "dropout": 0.2,
                       "head_epochs": 20, "lr_head": 3e-3, "finetune_epochs": 3, "lr_finetune": 1e-3,
                       "unfreeze": "blocks:2", "batch_size": 16, "patience": 0, "seed": 1, "steps_per_execution": 1,
                       "qat_epochs": 1, "qat_compare": False, "parity_inputs": 120, "floor_inputs": 60,
                       "rep_samples": 32, "client_inputs": 0}, out=run)
    assert result.metrics["finetune"]["val_accuracy"] >= 2 / 3   # 3 classes: 2x chance
    assert "val_accuracy" in result.metrics["qat"]                # QAT ran (tfmot takes every layer)
    text = (run / "config.yaml").read_text()
    assert f"backbone: file:{sha}" in text and str(bb.resolve()) in text
    report = (run / "report.md").read_text()
    assert sha in report and "split at merge points" in report
    bb.unlink()   # from here the run needs the file no more
    assert main(["export", str(run), "--tflite", "int8", "--onnx", "float", "--quiet"]) == 0
    assert main(["export", str(run), "--check", "--quiet"]) == 0
    assert main(["parity", str(run), "--quiet"]) == 0
    golden = run / "export" / "golden"
    assert json.loads((golden / "expected.json").read_text())["files"]
    for name in ("model_int8.tflite", "model.onnx"):
        done = subprocess.run([sys.executable, str(SCRIPT), "verify", str(run / "export" / name), str(golden)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "PASS" in done.stdout, done.stdout + done.stderr


def test_search_space_takes_a_backbone_file(files):
    """`edgeft search --backbones FILE.keras,mobilenet_v2 --sizes ...`: one candidate per size for
    the file (no widths), its own weights, --preprocess for the file only."""
    from edgeft.core.errors import UserError
    from edgeft.search.space import build_space, candidate_values, candidate_weights

    f = str(files / "bb.keras")
    space = build_space([f, "mobilenet_v2"], [0.35], [32, 48], "none")
    assert [c.id for c in space.candidates] == ["file_bb_32", "file_bb_48", "mobilenet_v2_a0.35_32",
                                                 "mobilenet_v2_a0.35_48"]
    assert candidate_weights("imagenet", space.candidates[0]) == ("imagenet", None)   # the file's own
    assert candidate_weights("none", space.candidates[0]) == ("none", None)
    values = {"preprocess": "none", "backbone_output": "features", "seed": 1}
    assert candidate_values(values, f) == values and candidate_values(values, "mobilenet_v2") == {"seed": 1}
    with pytest.raises(UserError, match="needs --sizes"):
        build_space([f], None, None, "imagenet")
