"""Quantization-aware training on the fine-tuned tiny model."""
import pytest

from edgeft import rundir
from edgeft.config import build_config
from edgeft.layers import Preprocess
from edgeft.qat import QAT_WEIGHTS, build_qat_model, load_qat_model, qat_supported


def test_qat_accuracy_within_tier_of_float(exported_run):
    run, report = exported_run
    m = rundir.read_json(run / "metrics.json")
    drop = m["finetune"]["val_accuracy"] - m["qat"]["val_accuracy"]
    assert drop <= 0.02 + 1e-9, m
    assert m["qat"]["val_accuracy"] >= 0.8
    assert report["keras_qat_accuracy"] == pytest.approx(m["qat"]["val_accuracy"], abs=1e-6)
    rows = rundir.read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in rows if r["stage"] == "qat"] == [1]
    assert (run / QAT_WEIGHTS).is_file()


def test_qat_model_quantizes_all_but_preprocessing(exported_run):
    run, _ = exported_run
    qat = load_qat_model(run)
    wrapped = [layer for layer in qat.layers if type(layer).__name__.startswith("QuantizeWrapper")]
    assert len(wrapped) > 50
    assert any(isinstance(layer, Preprocess) for layer in qat.layers)   # left out of annotation
    bn = [layer for layer in wrapped if type(layer.layer).__name__ == "BatchNormalization"]
    assert all(not layer.trainable for layer in bn)


def test_qat_refuses_nothing_it_should_support_and_reports_v3():
    ok, _ = qat_supported(build_config({"backbone": "mobilenet_v2"}))
    assert ok
    ok, note = qat_supported(build_config({"backbone": "mobilenet_v3_small"}))
    assert not ok and "PTQ" in note


def test_build_qat_model_keeps_weights(trained_run):
    import numpy as np

    qat = build_qat_model(trained_run.model)
    for name in ("Conv1", "block_16_project", "predictions"):
        kernel = [w for w in qat.get_layer("quant_" + name).weights if w.name.endswith("kernel:0")]
        assert len(kernel) == 1, name
        np.testing.assert_array_equal(kernel[0].numpy(), trained_run.model.get_layer(name).kernel.numpy())


def test_finetune_with_qat_on_mobilenet_v3_falls_back_to_ptq(tmp_path, image_folder):
    from conftest import run_cli

    out = tmp_path / "v3"
    r = run_cli("finetune", image_folder, "--backbone", "mobilenet_v3_small", "--alpha", "0.75", "--image-size", "32",
                "--weights", "none", "--head-epochs", "1", "--finetune-epochs", "0", "--qat-epochs", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hard-swish" in r.stdout and "PTQ" in r.stdout
    m = rundir.read_json(out / "metrics.json")
    assert "skipped" in m["qat"] and not (out / QAT_WEIGHTS).exists()
    assert "skipped" in (out / "report.md").read_text()
