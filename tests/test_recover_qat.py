"""Issue 30 item 4(d): int8 recovery by QAT at the requested granularity (edgeft.pipeline.recovery_qat).

Unit tests on a tiny QAT-able model (a few seconds each): when the candidate exists, that it trains
and converts to a per-tensor, integer-only file with integer I/O, that a deadline cuts training
short (and says so) or keeps it from starting, and that the weights it kept give the same bytes
without training (what `export --check` relies on). The end-to-end test, on the quick tier's run,
forces the cheaper candidates to fail and checks that the QAT file is judged, shipped, recorded and
rebuilt byte for byte by `export --check`."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest


def _ctx(granularity="per-tensor", model=None, run=None, n_train=48, backbone=None, qat_model=None, source="auto"):
    from edgeft.core.config import build_config
    from edgeft.data.datasets import ImageSet

    cfg = build_config({"int8_granularity": granularity, "int8_source": source, "batch_size": 8, "seed": 1,
                        "augment_policy": "none", "label_smoothing": 0.0,   # as a trained run resolves them
                        **({"backbone": backbone} if backbone else {})})
    rng = np.random.default_rng(0)
    y = np.arange(n_train) % 3
    x = rng.integers(0, 256, (n_train, 12, 12, 3), dtype=np.uint8)
    x[..., 0] = np.where(y[:, None, None] == 0, 250, x[..., 0])   # something to learn
    train = ImageSet.from_arrays(["a", "b", "c"], x, y)
    return SimpleNamespace(cfg=cfg, train_split=train, rep_images=x[:8].astype(np.float32), qat_model=qat_model,
                           model=model, metadata=False, labels=["a", "b", "c"], run=run, cache={})


def _tiny():
    from edgeft._keras import keras
    from edgeft.layers import Preprocess

    keras.utils.set_random_seed(0)
    x = inp = keras.Input((12, 12, 3))
    x = Preprocess("tf", name="pre")(x)
    # convolutions without bias, each with its BatchNorm, as in MobileNets (a QAT model's biased conv
    # without BatchNorm converts with per-channel scales even per-tensor: tflite_int8 refuses that file)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(6.0, name="a1")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(6.0, name="a2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="fc")(x))


def test_qat_is_a_candidate_only_with_training_images_a_qat_able_model_and_no_qat_model_weighed():
    from edgeft.pipeline import recovery

    _, _, skipped = recovery._candidates(_ctx(), "tflite_int8", "auto", None)
    assert "qat" not in skipped, skipped.get("qat")   # tried (after the cheaper ones)
    cases = {"weighed": _ctx(qat_model=object()), "no training images": _ctx(n_train=0),
             "hard-swish": _ctx(backbone="mobilenet_v3_small"), "--int8-source ptq": _ctx(source="ptq")}
    for why, ctx in cases.items():
        _, _, skipped = recovery._candidates(ctx, "tflite_int8", "auto", None)
        assert skipped["qat"].startswith("not tried") and why in skipped["qat"], (why, skipped["qat"])
    _, _, skipped = recovery._candidates(_ctx(), "onnx_int8", "auto", None)
    assert "tf2onnx writes float weights" in skipped["qat"] and "static" in skipped["qat"], skipped["qat"]
    from edgeft.pipeline import recovery_qat as rq

    cands = rq.candidates(_ctx())
    assert [(c.name, c.step) for c in cands] == [("qat per-tensor", "qat")]
    assert cands[0].settings["granularity"] == "per-tensor" and cands[0].settings["epochs"] == rq.DEFAULT_EPOCHS
    assert rq.candidates(_ctx("per-channel"))[0].name == "qat per-channel"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model's QAT candidate built once (trained 2 epochs): (ctx, candidate, file bytes)."""
    from edgeft.pipeline import recovery_qat as rq

    run = tmp_path_factory.mktemp("qatrec")
    model = _tiny()
    model.save(run / "model.keras")
    ctx = _ctx(model=model, run=run)
    cand = rq.candidates(ctx)[0]
    data = rq.build(ctx, cand, time.monotonic() + 600)
    return ctx, cand, data


def test_the_qat_candidate_trains_and_converts_to_a_per_tensor_integer_only_file(trained):
    from ai_edge_litert.interpreter import Interpreter

    from edgeft.export.keras2tflite import float_ops_in_tflite, per_channel_tensors
    from edgeft.quantize.int8_choice import tflite_probs

    ctx, cand, data = trained
    assert cand.settings["epochs_run"] == 2 and cand.settings["cut_short"] is False
    assert len(cand.settings["weights_sha256"]) == 64
    assert per_channel_tensors(data) == [] and float_ops_in_tflite(data) == []
    interp = Interpreter(model_content=data)
    assert interp.get_input_details()[0]["dtype"] == np.uint8 and interp.get_output_details()[0]["dtype"] == np.uint8
    assert tflite_probs(data, ctx.rep_images).shape == (8, 3)
    # the run's own files untouched: nothing but model.keras in the run
    assert sorted(p.name for p in ctx.run.iterdir()) == ["model.keras"]


def test_check_rebuilds_a_recovered_file_from_its_kept_weights(trained, tmp_path, monkeypatch):
    """What `export --check` does with a QAT-recovered file: the weights kept in export/ carried into
    the copy's export/, taken out of its staged export/, and converted again without training."""
    from edgeft.pipeline import recovery_qat as rq
    from edgeft.quantize import qat

    ctx, cand, data = trained
    shipped, copy = tmp_path / "export", tmp_path / "copy" / "export"
    shipped.mkdir()
    rq.keep(ctx, shipped)   # as recovery keeps them when the file ships
    assert json.loads((shipped / rq.RECORD).read_text())["weights_sha256"] == cand.settings["weights_sha256"]
    rq.carry(shipped, copy)   # export --check: into the copy of the run
    monkeypatch.setattr(qat, "train_qat_model", lambda *a, **k: pytest.fail("trained again"))
    again = _ctx(model=ctx.model, run=ctx.run)
    rq.take_earlier(copy, again)   # the staged export/ of the copy's re-export
    assert not (copy / rq.WEIGHTS).exists()   # out of the staged export/ until it ships again
    second = rq.candidates(again)[0]
    assert rq.build(again, second, time.monotonic() + 600) == data
    assert "earlier export" in second.settings["weights"]
    # another model (or other settings): the kept weights are not used
    other = _ctx(model=ctx.model, run=ctx.run)
    other.cfg = replace(other.cfg, qat=replace(other.cfg.qat, lr_qat=1e-3))
    other.cache["earlier_qat"] = again.cache["earlier_qat"]
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        rq.build(other, rq.candidates(other)[0], time.monotonic() + 600)


def test_the_deadline_cuts_training_short_or_keeps_it_from_starting(trained, monkeypatch):
    from edgeft.pipeline import recovery_qat as rq

    ctx = _ctx(model=trained[0].model, run=trained[0].run)
    cand = rq.candidates(ctx)[0]
    assert rq.too_late(ctx, cand, time.monotonic() + 600) is None
    why = rq.too_late(ctx, cand, time.monotonic() - 1)
    assert why.startswith("not tried: one QAT epoch estimated at") and "0 s left" in why
    rq.build(ctx, cand, time.monotonic() + 0.01)   # past the deadline after the first epoch
    assert cand.settings["epochs_run"] == 1 and cand.settings["cut_short"] is True


def _fake_recovery(monkeypatch, passes, built=None, late=None):
    """recovery._recover_file with its real candidates, order, bounds and record, but every file, run
    and gate faked (no TensorFlow): `passes(name)` is the gate's verdict on the chosen candidate."""
    from edgeft.pipeline import recovery
    from edgeft.pipeline import recovery_qat as rq

    n = 10
    halves = SimpleNamespace(x=np.zeros((n, 2)), probs=np.eye(2)[np.arange(n) % 2], screen_images=5,
                             judge=SimpleNamespace(source=np.arange(n), y=np.zeros(n)))
    monkeypatch.setattr(recovery, "_Halves", lambda ctx: halves)
    monkeypatch.setattr(recovery, "_latency", lambda *a: (lambda data: None))
    built = [] if built is None else built

    def builder(ctx, fmt_name, deadline=None):
        def build(r):
            built.append(r.name)
            if r.step == "qat":
                r.settings.update(epochs_run=r.settings["epochs"], cut_short=False, weights_sha256="0" * 64)
                ctx.cache["recovery_qat"] = ({"weights_sha256": "0" * 64}, b"weights")
            return r.name.encode()
        return build

    monkeypatch.setattr(recovery, "_builder", builder)
    monkeypatch.setattr(recovery, "_predict", lambda fmt: (lambda data, x: halves.probs))
    monkeypatch.setattr(rq, "too_late", lambda ctx, r, deadline: late)

    def gate(ctx, fmt, path, h):
        name = path.read_bytes().decode()
        ok = passes(name)
        return {"format": fmt.name, "file": fmt.filename, "passed": ok, "failures": [] if ok else ["no"],
                "failure_codes": [] if ok else ["accuracy_drop"], "made_from": "ptq"}

    monkeypatch.setattr(recovery, "_gate", gate)
    monkeypatch.setattr(rq, "judge", gate)
    return built


def _recover(tmp_path, ctx):
    from edgeft.pipeline import recovery
    from edgeft.pipeline.exporter import FORMATS

    fmt = next(f for f in FORMATS if f.name == "tflite_int8")
    ctx.made_from, ctx.inputs = {}, None
    return recovery._recover_file(ctx, [fmt], tmp_path, {}, {"format": fmt.name}, "auto", time.monotonic() + 600)[0]


def test_qat_comes_only_after_the_cheaper_candidates_chosen_file_fails_and_then_ships(tmp_path, monkeypatch, capsys):
    from edgeft.pipeline import recovery_qat as rq
    from edgeft.quantize.recover import recovery_markdown

    built = _fake_recovery(monkeypatch, lambda name: name.startswith("qat"))   # the cheaper chosen file fails
    rec = _recover(tmp_path, ctx := _ctx())
    steps = [t["step"] for t in rec["tried"]]
    assert steps[0] == "equalization" and set(steps[1:-1]) == {"calibration"} and steps[-1] == "qat", steps
    assert [j["passed"] for j in rec["judgements"]] == [False, True] and built[-1] == "qat per-tensor"
    assert rec["shipped"]["name"] == "qat per-tensor" and rec["shipped"]["weights"] == rq.WEIGHTS
    assert (tmp_path / "model_int8.tflite").read_bytes() == b"qat per-tensor"
    assert (tmp_path / rq.WEIGHTS).read_bytes() == b"weights" and (tmp_path / rq.RECORD).is_file()
    assert ctx.made_from["tflite_int8"] == rq.MADE_FROM and rec["judgements"][-1]["row"]["made_from"] == rq.MADE_FROM
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("recover: ")]
    assert len(said) == 1 + len(rec["tried"]) + len(rec["judgements"]) and max(map(len, said)) <= 100, said
    md = "\n".join(recovery_markdown([rec]))
    assert "| equalization + bias correction | equalization |" in md and "| qat per-tensor | qat |" in md
    assert "- qat per-tensor: trained 2 of 2 epoch(s)" in md and "weights sha256 000000000000" in md
    assert "- shipped: model_int8.tflite (qat per-tensor)" in md


def test_no_qat_when_a_cheaper_file_passes_and_qat_when_none_could_be_made(tmp_path, monkeypatch):
    from edgeft.quantize import recover

    built = _fake_recovery(monkeypatch, lambda name: True)
    rec = _recover(tmp_path, _ctx())
    assert "qat" not in [t["step"] for t in rec["tried"]] and not any(b.startswith("qat") for b in built)
    assert rec["shipped"]["name"] != "qat per-tensor"
    # none of the cheaper ones could be built: straight to QAT
    _fake_recovery(monkeypatch, lambda name: True)
    monkeypatch.setattr(recover, "equalization_candidates", list)
    monkeypatch.setattr(recover, "tflite_calibration_candidates", lambda *a, **k: [])
    rec = _recover(tmp_path, _ctx())
    assert [t["step"] for t in rec["tried"]] == ["qat"] and rec["shipped"]["name"] == "qat per-tensor"


def test_qat_within_the_bounds_and_said_when_not_started(tmp_path, monkeypatch):
    from edgeft.quantize import recover

    _fake_recovery(monkeypatch, lambda name: name.startswith("qat"), late="not tried: one QAT epoch estimated at 900 s")
    rec = _recover(tmp_path, _ctx())
    assert rec["not_tried"]["qat"].startswith("not tried: one QAT epoch") and rec["shipped"] is None
    assert "qat" not in [t["step"] for t in rec["tried"]]
    _fake_recovery(monkeypatch, lambda name: name.startswith("qat"))
    monkeypatch.setattr(recover, "MAX_CANDIDATES", 3)   # the cheaper ones use them all
    rec = _recover(tmp_path, _ctx())
    assert len(rec["tried"]) == 3 and rec["not_tried"]["qat"] == "not tried: 3 candidates tried already"


def test_mixed_keeps_only_ops_whose_float_copy_removed_error(monkeypatch):
    """Issue 30 item 4(c): a mixed candidate keeps float only ops the per-layer report confirmed (kept
    float one at a time, each removed >= NAMED_REMOVED of the output error); when none did, mixed is
    not tried and the record says why (the real emoji Lite0's ONNX report confirmed one op, the head's
    bias Add, which removed 0 %)."""
    from edgeft.pipeline import recovery

    def top_of(*removed):
        return [{"layer": f"l{i}", "tensor": f"t{i}", "node": f"n{i}", "output_error_removed": r}
                for i, r in enumerate(removed)]

    ctx = _ctx(source="ptq")
    monkeypatch.setattr(recovery, "_report_top", lambda *a: top_of(0.6, 0.0, 0.2))
    _, mixed, skipped = recovery._candidates(ctx, "tflite_int8", "allow-mixed", None)
    assert [c.settings["layers"] for c in mixed] == [["l0"], ["l0", "l2"]] and "mixed" not in skipped
    monkeypatch.setattr(recovery, "_report_top", lambda *a: top_of(0.0, 0.05))
    _, mixed, skipped = recovery._candidates(ctx, "onnx_int8", "allow-mixed", None)
    assert mixed == [] and "no op of the per-layer report removed 10%" in skipped["mixed"]
