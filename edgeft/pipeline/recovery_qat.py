"""Int8 recovery step (d): QAT at the requested granularity (issue 30 item 4(d)).

Tried last among the candidates for the int8 TFLite file (the most expensive: it trains), only
when the cheaper candidates' chosen file failed the gate (or none could be screened), and only
when the run has data for it: training images, a backbone tfmot's QAT takes, and no QAT model that
the int8 choice weighed already (`ctx.qat_model is None`; not under `--int8-source ptq`, which asks
for post-training quantization). The QAT model is trained from model.keras as `edgeft qat` trains it
(edgeft.quantize.qat.train_qat_model, the run's QAT settings, `edgeft qat`'s 2 epochs when the run
has none), without touching the run's own files, and converted as the int8 choice converts a QAT
model (`tflite_int8`: integer-only, per-tensor checked where asked); it is then screened and gated
like every candidate. ONNX: not tried (tf2onnx writes float weights for a QAT model; the ONNX int8
file is made by ONNX Runtime's static PTQ).

Bounds: an epoch is estimated before training starts (a timed batch of the float model, scaled by
QAT_STEP_COST); no epoch starts that the recovery's deadline cannot hold, and the record says when
training was cut short. Reproducible: the trained weights that made a shipped file are kept as
export/recovery_qat.weights.h5 (their sha256 and what they were trained from in
export/recovery_qat.json and the recovery record); an export of the same model with the same
settings, `export --check`'s among them, converts those weights instead of training again.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeft.core import rundir
from edgeft.quantize.recover import TIME_BUDGET_S, Recovery

log = logging.getLogger(__name__)

WEIGHTS = "recovery_qat.weights.h5"   # in export/, beside the file they made
RECORD = "recovery_qat.json"
DEFAULT_EPOCHS = 2      # `edgeft qat`'s default, when the run's config has qat_epochs 0
QAT_STEP_COST = 6.0     # one QAT training image against one float forward image (forward + backward,
# fake-quant ops): a rough factor, building and tracing the QAT model left out (on a small model
# they are most of the time); what training took is in the record beside the estimate
MADE_FROM = "recovery-qat"   # formats.json / the parity row: not the run's QAT model (`made_from` "qat")
ONNX_WHY = ("not tried: tf2onnx writes float weights for a QAT model; the ONNX int8 file is made by ONNX "
            "Runtime's static post-training quantization")


def skip_reason(ctx, fmt_name: str) -> str | None:
    """Why step (d) is not tried for this file, or None when it is (cheaper candidates first)."""
    if fmt_name != "tflite_int8":
        return ONNX_WHY
    if ctx.cfg.export.int8_source == "ptq":
        return "not tried: --int8-source ptq asks for post-training quantization"
    if ctx.qat_model is not None:
        return "not tried: this run's QAT model was weighed by the int8 choice already"
    if ctx.train_split is None or len(ctx.train_split.y) == 0:
        return "not tried: no training images"
    from edgeft.quantize.qat import qat_supported

    ok, note = qat_supported(ctx.cfg, ctx.model)
    return None if ok else f"not tried: {note}"


def candidates(ctx) -> list[Recovery]:
    """The one QAT candidate. Its activation ranges are seeded from as many calibration images as
    step (a)'s largest candidate uses (the ranges QAT starts from are a calibration like PTQ's)."""
    from edgeft.core.config import REP_SAMPLES_MAX
    from edgeft.quantize.recover import tflite_calibration_candidates

    q, g = ctx.cfg.qat, ctx.cfg.export.int8_granularity
    epochs, n_train = q.qat_epochs or DEFAULT_EPOCHS, int(len(ctx.train_split.y))
    sizes = [c.settings["rep_samples"] for c in tflite_calibration_candidates(len(ctx.rep_images), n_train,
                                                                              REP_SAMPLES_MAX)]
    return [Recovery(f"qat {g}", "qat", {"granularity": g, "epochs": epochs, "lr": q.lr_qat,
                                         "freeze_epochs": min(q.qat_freeze_epochs, epochs), "train_images": n_train,
                                         "calibration_images": max([len(ctx.rep_images), *sizes])})]


def _images(ctx, r: Recovery) -> np.ndarray:
    from edgeft.data.datasets import representative_images

    n = r.settings["calibration_images"]
    return (np.asarray(ctx.rep_images) if n == len(ctx.rep_images)
            else representative_images(ctx.train_split, n, ctx.cfg.train.seed, warn=False))


def estimate_epoch_s(ctx) -> float:
    """Seconds one QAT epoch should take: a timed batch of the float model (after one untimed) per
    image, times QAT_STEP_COST, times the training images."""
    x = np.asarray(ctx.rep_images[:ctx.cfg.data.batch_size], np.float32)
    ctx.model.predict_on_batch(x)
    t0 = time.perf_counter()
    ctx.model.predict_on_batch(x)
    return QAT_STEP_COST * (time.perf_counter() - t0) / len(x) * len(ctx.train_split.y)


def too_late(ctx, r: Recovery, deadline: float) -> str | None:
    """Why not to start training (one epoch would not end before the deadline), or None."""
    est = estimate_epoch_s(ctx)
    r.settings["estimated_epoch_s"] = round(est, 2)
    left = deadline - time.monotonic()
    if est > left:
        return (f"not tried: one QAT epoch estimated at {est:.0f} s, {max(left, 0):.0f} s left of the recovery's "
                f"{TIME_BUDGET_S:.0f} s")
    return None


def take_earlier(stage: Path, ctx) -> None:
    """The QAT weights an earlier export shipped with, out of the staged export/ (they stay only when
    this export's file is made from them again) and kept in memory for `build`."""
    weights, record = stage / WEIGHTS, stage / RECORD
    if weights.is_file():
        ctx.cache["earlier_qat"] = (rundir.read_json(record, {}) or {}, weights.read_bytes())
    weights.unlink(missing_ok=True)
    record.unlink(missing_ok=True)


def _key(ctx, r: Recovery, images: np.ndarray) -> dict:
    """What the weights were trained from: the same key, the same weights."""
    from edgeft.export.manifest import fingerprint, sha256_file

    c = ctx.cfg
    return {"model_keras_sha256": sha256_file(Path(ctx.run) / rundir.MODEL),
            "calibration_sha256": fingerprint(images), "seed": c.train.seed,
            "batch_size": c.data.batch_size, "augment": c.data.augment_policy,
            "label_smoothing": c.train.label_smoothing} | {k: r.settings[k] for k in
                                                           ("granularity", "epochs", "lr", "freeze_epochs", "train_images",
                                                            "calibration_images")}


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _deadline(deadline: float, epochs: int):
    """A Keras callback: after each epoch, stops training when one more epoch like it would end past
    `deadline` (time.monotonic()); `.done` epochs trained, `.cut` when it stopped them."""
    from edgeft._keras import keras

    class Deadline(keras.callbacks.Callback):
        done, cut, t = 0, False, 0.0

        def on_epoch_begin(self, *_):
            self.t = time.monotonic()

        def on_epoch_end(self, *_):
            self.done += 1
            now = time.monotonic()
            if self.done < epochs and now + (now - self.t) > deadline:
                self.model.stop_training, self.cut = True, True

    return Deadline()


def _weights_bytes(qat) -> bytes:
    fd, path = tempfile.mkstemp(suffix=".weights.h5")
    os.close(fd)
    try:
        qat.save_weights(path)
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


def _load(ctx, data: bytes, granularity: str):
    from edgeft.nn.model import float32_policy
    from edgeft.quantize.qat import build_qat_model

    fd, path = tempfile.mkstemp(suffix=".weights.h5")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with float32_policy():
            qat = build_qat_model(ctx.model, granularity)
            qat.load_weights(path)
        return qat
    finally:
        os.unlink(path)


def _train(ctx, r: Recovery, images: np.ndarray, deadline: float):
    from edgeft.quantize.qat import train_qat_model
    from edgeft.train.distribute import make_scope

    c = ctx.cfg
    scope = make_scope(replace(c.train, mixed_precision=False, strategy="default"))   # in this process, float32
    stop = _deadline(deadline, r.settings["epochs"])
    t0 = time.monotonic()
    qat = train_qat_model(ctx.model, c, scope, ctx.train_split, None, len(ctx.labels), images,
                          r.settings["epochs"], [stop], quiet=True)
    took = time.monotonic() - t0
    log.debug(f"recover: {r.name}: trained {stop.done} of {r.settings['epochs']} epoch(s) in {took:.1f} s"
              + (" (cut short: the recovery's deadline)" if stop.cut else ""))
    return qat, {"epochs_run": stop.done, "cut_short": stop.cut, "train_s": round(took, 1)}


def build(ctx, r: Recovery, deadline: float) -> bytes:
    """The candidate's file: the QAT model (the earlier export's weights when trained from the same
    key, else trained now) converted as the int8 choice converts one. Its weights wait in ctx.cache
    for `keep`; what training did goes into the candidate's settings (the record)."""
    from edgeft.export.builders import with_metadata
    from edgeft.export.keras2tflite import tflite_int8

    ex, images = ctx.cfg.export, _images(ctx, r)
    key = _key(ctx, r, images)
    earlier, data = ctx.cache.get("earlier_qat", ({}, b""))
    if earlier.get("key") == key and earlier.get("weights_sha256") == _sha(data):
        qat, done = _load(ctx, data, ex.int8_granularity), {k: earlier[k] for k in ("epochs_run", "cut_short", "train_s")}
        done["weights"] = f"the earlier export's {WEIGHTS} (same model and settings)"
    else:
        qat, done = _train(ctx, r, images, deadline)
        data = _weights_bytes(qat)
    r.settings.update(done, weights_sha256=_sha(data))
    ctx.cache["recovery_qat"] = ({"key": key, "weights_sha256": _sha(data)} | {k: done[k] for k in
                                                                               ("epochs_run", "cut_short", "train_s")}, data)
    ctx.cache["recovery_qat_model"] = qat   # the gate judges the file against it (`judge`)
    return with_metadata(tflite_int8(qat, images, ex.int8_io, ex.int8_granularity), ctx)


def judge(ctx, fmt, path: Path, halves) -> dict:
    """The gate's row for step (d)'s file on the judging half: as the gate judges any int8 file made
    from a QAT model (against that model, with its own floor: edgeft.verify.parity), and its accuracy
    against the float model's too, since it replaces a file made from the float model (a QAT model
    that lost accuracy in training must not ship through a faithful conversion)."""
    from dataclasses import asdict

    from edgeft.core.tiers import judge as tier_judge
    from edgeft.quantize.int8_choice import keras_probs, tflite_probs
    from edgeft.verify.parity import _gate_row

    j, p, seed = halves.judge, ctx.cfg.parity, ctx.cfg.train.seed
    qat_ref = keras_probs(ctx.cache["recovery_qat_model"], j.x)
    row = asdict(_gate_row(fmt, path, j.x, j.y, j.source, p, seed, halves.judge_ref, qat_ref, {fmt.name: "qat"}, {},
                           j, ctx.labels, {}))
    vs_float = tier_judge("int8", tflite_probs(path.read_bytes(), j.x), halves.judge_ref, j.y, j.source, p, None, seed)
    row["accuracy_drop_vs_float_points"] = vs_float.accuracy_drop_points
    lost = [f for f in vs_float.failures if f.code == "accuracy_drop"]
    if lost:
        row["failures"] = list(row["failures"]) + [f"against the float model: {f}" for f in lost]
        row["failure_codes"] = list(row["failure_codes"]) + ["accuracy_drop"]
        row["passed"] = False
        row["verdict"] = "fails: accuracy drop against the float model"
    return row | {"file": fmt.filename}


def keep(ctx, stage: Path) -> None:
    """The weights that made the shipped file, into the staged export/ (atomic writes)."""
    record, data = ctx.cache["recovery_qat"]
    rundir.write_bytes(stage / WEIGHTS, data)
    rundir.write_json(stage / RECORD, record | {"file": WEIGHTS, "what": "QAT weights that made model_int8.tflite "
                                                "(int8 recovery step (d)); `export --check` converts them again"})


def carry(src: Path, dst: Path) -> None:
    """`export --check`: the kept weights (if any) into the copy's export/, so its re-export converts
    the weights the shipped file was made from."""
    import shutil

    for name in (WEIGHTS, RECORD):
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
