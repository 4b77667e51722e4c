"""The parity gate can fail: wrong exports exit 1 and are named."""
import json
import shutil

import numpy as np

from conftest import run_cli
from edgeft.core.config import ParityConfig
from edgeft.core.tiers import exact_failures, judge


def test_tier_checks_fail_when_they_should():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    assert exact_failures(ref + 5e-5, ref, 1e-4) == []
    assert exact_failures(ref + 2e-4, ref, 1e-4)
    p = ParityConfig()
    flipped = ref.copy()
    flipped[2] = [0.4, 0.6]   # one of four clear predictions changes: 75 % agreement, 25 points lost
    # 40 inputs (ten of each): the gate judges nothing on fewer than MIN_JUDGED (30) inputs
    big, bigf, bigy, groups = np.tile(ref, (10, 1)), np.tile(flipped, (10, 1)), np.tile(y, 10), np.arange(40)
    assert judge("int8", big, big, bigy, groups, p).failures == []
    fails = judge("int8", bigf, big, bigy, groups, p).failures
    assert any("agreement on clear inputs" in f for f in fails) and any("accuracy drop" in f for f in fails)
    assert all(f.startswith("not judged") for f in judge("int8", ref, ref, y, np.arange(4), p).failures)
    # a near-tie (top-1 margin 0.1 < clear_margin) that flips is listed, not counted against agreement
    tie = np.array([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.3, 0.7]])
    j = judge("int8", np.array([[0.9, 0.1], [0.2, 0.8], [0.45, 0.55], [0.3, 0.7]]), tie, y, np.arange(4), p)
    assert j.near_tie_flips == [2] and j.real_disagreements == [] and j.clear_agreement == 1.0 and j.n_left_out == 1


def _wrong_tflite(model, mode_break: str):
    """A float TFLite file of a subtly wrong model: perturbed weights or wrong preprocessing."""
    from edgeft._keras import keras, tf
    from edgeft.layers import Preprocess
    from edgeft.nn.model import custom_objects

    with keras.utils.custom_object_scope(custom_objects()):
        bad = keras.models.clone_model(model)
    bad.set_weights(model.get_weights())
    if mode_break == "weights":
        dense = bad.get_layer("predictions")
        w, b = dense.get_weights()
        dense.set_weights([w + np.random.default_rng(0).normal(0, 0.05, w.shape).astype(w.dtype), b])
    else:
        next(layer for layer in bad.layers if isinstance(layer, Preprocess)).mode = "torch"
    return tf.lite.TFLiteConverter.from_keras_model(bad).convert()


def test_wrong_exports_fail_the_gate_with_exit_1(exported_run, trained_run, tmp_path):
    run, _ = exported_run
    for breakage in ("weights", "preprocessing"):
        copy = tmp_path / breakage
        shutil.copytree(run, copy)
        for other in (copy / "export").glob("model*"):   # the gate then runs only the broken file
            if other.name != "model_float.tflite":
                other.unlink()
        (copy / "export" / "model_float.tflite").write_bytes(_wrong_tflite(trained_run.model, breakage))
        (copy / "export" / "manifest.json").unlink()   # else parity refuses the edited export up front (test_ship)
        # how the deleted int8 files were made (a QAT int8 file would have the gate load the QAT model)
        (copy / "export" / "formats.json").unlink()
        r = run_cli("parity", copy, "--parity-inputs", "200", "--client-inputs", "0")
        assert r.returncode == 1, (breakage, r.returncode, r.stderr[-2000:])
        assert "tflite_float" in r.stderr and "model_float.tflite" in r.stderr
        assert "Traceback" not in r.stderr
        assert max(len(line) for line in r.stderr.splitlines()) <= 100, r.stderr   # the why: parity.md
        md = (copy / "export" / "parity.md").read_text()
        assert "FAIL" in md
        assert "model_float.tflite (litert): a float file must match Keras" in md   # the remedy for this tier
        report = json.loads((copy / "export" / "parity.json").read_text())
        assert report["passed"] is False and len(report["remedies"]) == 1


def test_parity_passes_on_the_good_export(exported_run):
    run, _ = exported_run
    r = run_cli("parity", run, "--client-inputs", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pass their tier against their source model" in r.stdout
    assert "What to do" not in r.stdout
    # issue 29 item 1: a short console (tables in the log and parity.md) and a summary matching the files
    from test_console import check_console, check_summary

    check_console(r.stdout + r.stderr, "edgeft parity")
    n_test = json.loads((run / "split.json").read_text())["counts"]["test"]
    assert "| format |" not in r.stdout and f"test n={n_test}" in r.stdout
    check_summary(run, json.loads((run / "export" / "parity_summary.json").read_text()), "parity", n_test)


def test_parity_on_a_run_without_exports_is_a_user_error(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, copy)
    r = run_cli("parity", copy)
    assert r.returncode == 2 and "edgeft export" in r.stderr
