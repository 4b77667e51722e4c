"""Quantization-aware training of a fine-tuned run (tensorflow-model-optimization).

The flat model is annotated layer by layer, leaving out the input and the `Preprocess` layer
(it scales raw pixels; TFLite quantizes its output like any activation), then `quantize_apply`
inserts fake-quant ops. BatchNorm stays frozen, as in stage 2. Backbones QAT breaks on
(MobileNetV3's hard-swish) are reported and left to post-training quantization.
"""
from __future__ import annotations

import logging
import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np

from edgeft._keras import keras, tf
from edgeft.core import byob, rundir
from edgeft.core.config import EdgeftConfig
from edgeft.core.errors import UserError
from edgeft.core.progress import Progress, stage
from edgeft.core.registry import get_backbone
from edgeft.layers import Preprocess, preprocess_output_range, training_loss
from edgeft.nn.model import custom_objects, float32_policy, is_batchnorm, load_model
from edgeft.run import Run, as_run
from edgeft.train.callbacks import EpochLog
from edgeft.train.recipe import class_weight_dict

log = logging.getLogger(__name__)

# Saved as weights and rebuilt from model.keras: tfmot's wrappers do not round-trip through the
# .keras format (variable order differs on load: "expected 4 variables, received 5").
QAT_WEIGHTS, QAT_INFO = rundir.QAT_WEIGHTS, rundir.QAT_INFO   # QAT_INFO: granularity, epochs...
INPUT_RANGE = (0.0, 255.0)   # raw RGB pixels, the input contract of every edgeft model


def _tfmot():
    import tensorflow_model_optimization as tfmot

    return tfmot


def build_qat_model(model: keras.Model, granularity: str = "per-channel", *, exact_input: bool = True,
                    depthwise_per_channel: bool = True) -> keras.Model:
    """A quantization-aware copy of the flat float model (weights carried over).

    Every layer is annotated; `Preprocess` gets a fixed output range (what pixels 0-255 map to)
    and the input a fixed 0-255 range, so the simulated model quantizes exactly where the int8
    file does. Weight ranges follow `granularity` (see qat_configs). Activation ranges start
    at tfmot's [-6, 6]: `calibrate_ranges` seeds them from real images before training.
    `exact_input=False` / `depthwise_per_channel=False` give tfmot's defaults back (only
    tools/bench_quant.py uses them, to measure what each fix is worth).
    """
    from edgeft.quantize import qat_configs

    qk = _tfmot().quantization.keras
    # Keras numbers automatic layer names per process (quantize_layer_3, ...) and those names end
    # up in the converted file: restart the count so the same model gives the same bytes
    keras.backend.reset_uids()

    def annotate(layer):
        copy = layer.__class__.from_config(layer.get_config())
        if isinstance(layer, keras.layers.InputLayer):
            return copy
        if isinstance(layer, Preprocess) and not exact_input:
            return copy
        if isinstance(layer, Preprocess):
            copy = layer.qat_form()   # the same values on an exact 8-bit grid where there is one
            return qk.quantize_annotate_layer(copy, qat_configs.FixedRangeQuantizeConfig(
                *preprocess_output_range(copy.mode, copy.mean, copy.std)))
        return qk.quantize_annotate_layer(copy)

    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with qk.quantize_scope(custom_objects() | qat_configs.custom_objects()):
        qat = qk.quantize_apply(annotated, scheme=qat_configs.quantize_scheme(granularity, depthwise_per_channel))
    for layer in qat.layers:   # keep BatchNorm in inference mode, as in stage 2
        inner = getattr(layer, "layer", layer)
        if is_batchnorm(inner):
            layer.trainable = False
    _set_input_range(qat)
    return qat


def _input_quantizers(qat: keras.Model) -> list:
    return [layer for layer in qat.layers if type(layer).__name__ == "QuantizeLayer"]


def _set_input_range(qat: keras.Model) -> None:
    """Raw pixels 0-255 are exact in 8 bits with scale 1: pin the input quantizer's range there
    (tfmot starts it at [-6, 6] and only ever widens it)."""
    for layer in _input_quantizers(qat):
        for var in layer.weights:
            if var.name.endswith("_min:0"):
                var.assign(tf.fill(var.shape, INPUT_RANGE[0]))
            elif var.name.endswith("_max:0"):
                var.assign(tf.fill(var.shape, INPUT_RANGE[1]))


def activation_range_vars(qat: keras.Model) -> list[tuple[str, object, object]]:
    """(layer name, min, max) of every activation quantizer (not the weights', not the input's)."""
    found = []
    for layer in qat.layers:
        if type(layer).__name__ != "QuantizeWrapperV2":
            continue
        pairs: dict[str, dict] = {}
        for var in layer.non_trainable_weights:
            name = var.name.split("/")[-1].split(":")[0]
            for end in ("_min", "_max"):
                if name.endswith(end) and not name.endswith("kernel" + end):
                    pairs.setdefault(name[:-len(end)], {})[end] = var
        found += [(layer.name, v["_min"], v["_max"]) for v in pairs.values() if len(v) == 2]
    return found


def _nudged_scale(lo: float, hi: float) -> float:
    return (max(hi, 0.0) - min(lo, 0.0)) / 255.0


def range_mismatches(qat: keras.Model, tflite: bytes, rel: float = 1e-3) -> list[str]:
    """Where the int8 file does not use the range the QAT model trained (empty when it does):
    the input must be raw pixels at scale 1, and every activation range that the file keeps as
    a tensor must have the trained scale. A second calibration at conversion would show here."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=tflite)
    tensors = [t for t in interp.get_tensor_details() if len(t["quantization_parameters"]["scales"]) == 1]
    out = []
    scale = float(interp.get_input_details()[0]["quantization"][0])
    if abs(scale - 1.0) > rel:
        out.append(f"input: scale {scale:g}, expected 1 (raw pixels)")
    for name, lo, hi in activation_range_vars(qat):
        produced = [t for t in tensors if f"/{name}/" in t["name"].split(";")[0] + "/"]
        if not produced:
            continue   # folded into another op's output: nothing of its own in the file
        # a layer can produce several tensors (a Dense's logits, then its softmax at TFLite's fixed
        # 1/256): the trained range must be the scale of one of them
        got = [float(t["quantization_parameters"]["scales"][0]) for t in produced]
        want = _nudged_scale(float(lo.numpy().min()), float(hi.numpy().max()))
        if not any(abs(g - want) <= rel * want for g in got):
            out.append(f"{name}: file scale {got[-1]:.6g}, trained {want:.6g}")
    return out


@contextlib.contextmanager
def activation_ranges(mode: str):
    """How tfmot's moving-average activation quantizers behave in training mode inside the block:
    "minmax" widens each range to the running min/max of what it sees (calibration, as the
    converter's PTQ calibration does), "frozen" keeps the ranges fixed (weights still train)."""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    original = quant_ops.MovingAvgQuantize

    def replacement(inputs, min_var, max_var, per_channel=False, ema_decay=0.999, name_prefix="MovingAvgQuantize",
                    is_training=True, num_bits=8, narrow_range=False, symmetric=False):
        if mode == "frozen" or not is_training or per_channel or symmetric:
            return original(inputs, min_var, max_var, per_channel=per_channel, ema_decay=ema_decay,
                            name_prefix=name_prefix, is_training=is_training and mode != "frozen",
                            num_bits=num_bits, narrow_range=narrow_range, symmetric=symmetric)
        lo = min_var.assign(tf.minimum(min_var, tf.minimum(tf.reduce_min(inputs), 0.0)))
        hi = max_var.assign(tf.maximum(max_var, tf.maximum(tf.reduce_max(inputs), 0.0)))
        return quant_ops._FakeQuantWithMinMaxVars(inputs, lo, hi, per_channel=False, num_bits=num_bits,  # noqa: SLF001
                                                  narrow_range=narrow_range)

    quant_ops.MovingAvgQuantize = replacement
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


@contextlib.contextmanager
def _no_dropout(model: keras.Model):
    drops = [getattr(layer, "layer", layer) for layer in model.layers]
    drops = [(d, d.rate) for d in drops if isinstance(d, keras.layers.Dropout)]
    for d, _ in drops:
        d.rate = 0.0
    try:
        yield
    finally:
        for d, rate in drops:
            d.rate = rate


def calibrate_ranges(qat: keras.Model, images, batch_size: int = 32) -> None:
    """Seeds every activation range from real images: tfmot starts them at [-6, 6] and moves
    them by an EMA with decay 0.999 per step (~1,000 steps to settle), so a short QAT otherwise
    trains with ranges the file will not have. Runs the model in training mode (ranges and
    weight ranges update; BatchNorm is frozen, dropout switched off) with running min/max."""
    for _, lo, hi in activation_range_vars(qat):
        lo.assign(tf.zeros_like(lo))
        hi.assign(tf.zeros_like(hi))
    with activation_ranges("minmax"), _no_dropout(qat):
        step = tf.function(lambda x: qat(x, training=True))
        with Progress("qat: calibrating activation ranges", len(images)) as bar:
            for i in range(0, len(images), batch_size):
                step(tf.constant(np.asarray(images[i:i + batch_size], np.float32)))
                bar.update(min(batch_size, len(images) - i))
    _set_input_range(qat)


def load_qat_model(run: Run | str | Path) -> keras.Model | None:
    """The run's QAT model, or None when QAT was not run."""
    model = run.model if isinstance(run, Run) else None
    run = Path(run.path if isinstance(run, Run) else run)
    if not (run / QAT_WEIGHTS).is_file():
        return None
    info = rundir.read_json(run / QAT_INFO, {})
    qat = build_qat_model(model if model is not None else load_model(run / rundir.MODEL),
                          info.get("granularity", "per-channel"))
    try:
        qat.load_weights(str(run / QAT_WEIGHTS))
    except Exception:   # a QAT model saved by an older edgeft (other quantizers): not loadable here
        raise UserError(f"{run / QAT_WEIGHTS} was made by an older edgeft; run `edgeft qat {run}` again") from None
    return qat


def qat_granularity(run: Run | str | Path) -> str | None:
    run = Path(run.path if isinstance(run, Run) else run)
    return rundir.read_json(run / QAT_INFO, {}).get("granularity") if (run / QAT_WEIGHTS).is_file() else None


def qat_supported(cfg: EdgeftConfig, model: keras.Model | None = None) -> tuple[bool, str]:
    """(QAT works on the run's backbone, why not). A registry row says so itself; a backbone file
    is asked of tfmot layer by layer (`model`: the run's float model)."""
    if not byob.is_file_backbone(cfg.model.backbone):
        bb = get_backbone(cfg.model.backbone)
        return bb.qat, bb.qat_note
    layer = first_unsupported_layer(model, cfg.export.int8_granularity) if model is not None else None
    if layer is None:
        return True, ""
    return False, (f"tensorflow-model-optimization QAT does not support layer {layer} of the backbone file; "
                   f"edgeft uses post-training quantization (PTQ)")


def first_unsupported_layer(model: keras.Model, granularity: str = "per-channel") -> str | None:
    """`'name' (Class)` of the layer that stops tfmot's QAT on `model`, or None when it works: a dry
    run of build_qat_model (tfmot folds Conv + BatchNorm first, so its registry alone refuses too
    much); the layer is read from tfmot's error, else the first its 8-bit registry does not take."""
    import re

    from edgeft.quantize import qat_configs

    try:
        with float32_policy():
            build_qat_model(model, granularity)
        return None
    except Exception as e:   # tfmot: "Layer NAME:<class ...> is not supported. ..."
        text = str(e)
    by_name = {layer.name: layer for layer in model.layers}
    found = re.search(r"Layer ([^\s:]+):", text)
    if found and found.group(1) in by_name:
        layer = by_name[found.group(1)]
        return f"{layer.name!r} ({type(layer).__name__})"
    registry = qat_configs.quantize_scheme(granularity).get_quantize_registry()
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.InputLayer, Preprocess)) and not registry.supports(layer):
            return f"{layer.name!r} ({type(layer).__name__})"
    return f"(tfmot: {(text.strip().splitlines() or ['?'])[0][:200]})"


def train_qat(qat: keras.Model, train_ds, val_ds, epochs: int, freeze_epochs: int, callbacks=(),
              steps: tuple[int | None, int | None] = (None, None), class_weight: dict | None = None) -> None:
    """QAT epochs: ranges follow tfmot's moving averages, then the last `freeze_epochs` keep them
    fixed (weights still train against the ranges the file will have). `steps`: steps per epoch
    of train_ds and val_ds when they repeat (multiworker), else None."""
    free = max(epochs - freeze_epochs, 0)
    fit = dict(validation_data=val_ds, steps_per_epoch=steps[0], validation_steps=steps[1], verbose=0,
               class_weight=class_weight)
    if free:
        qat.fit(train_ds, epochs=free, callbacks=list(callbacks), **fit)
        if qat.stop_training:   # a callback stopped it (recovery's deadline): the frozen epochs too
            return
    if epochs > free:
        with activation_ranges("frozen"):
            qat.train_function = qat.test_function = None   # retrace under the frozen quantizers
            qat.fit(train_ds, initial_epoch=free, epochs=epochs, callbacks=list(callbacks), **fit)
        qat.train_function = qat.test_function = qat.predict_function = None


def train_qat_model(model: keras.Model, cfg: EdgeftConfig, scope, train, val, n_classes: int, rep, epochs: int,
                    callbacks=(), quiet: bool = False) -> keras.Model:
    """The QAT model of the float `model` at `cfg.export.int8_granularity`: built, activation ranges
    seeded from `rep` (calibrate_ranges), trained `epochs` on `train` (`val`: validation data, or None
    for none) with cfg's QAT settings, then compiled again for evaluation. What `edgeft qat` and
    export's int8 recovery (step (d), edgeft.pipeline.recovery_qat) both run; `quiet`: its line in the
    log only (recovery's own line per candidate is the console's)."""
    granularity = cfg.export.int8_granularity
    with float32_policy():
        with scope.strategy.scope():
            qat = build_qat_model(model, granularity)
            calibrate_ranges(qat, rep)
            # several steps per call for fit only (see training.train_finetune): compiled again after it
            compiled = dict(optimizer=keras.optimizers.Adam(cfg.qat.lr_qat),
                            loss=training_loss(cfg.train.label_smoothing), metrics=["accuracy"])
            qat.compile(**compiled, steps_per_execution=cfg.train.steps_per_execution)
        (log.debug if quiet else log.info)(f"qat: {granularity} weights, activation ranges seeded from {len(rep)} training images")
        bs = cfg.data.batch_size
        train_qat(qat, scope.dataset(train, bs, True, cfg.data.augment_policy, cfg.train.seed),
                  None if val is None else scope.dataset(val, bs), epochs, min(cfg.qat.qat_freeze_epochs, epochs),
                  callbacks, (scope.steps(train, bs), None if val is None else scope.steps(val, bs)),
                  class_weight_dict(cfg, train.y, n_classes))
        with scope.strategy.scope():
            qat.compile(**compiled)   # one step per call for evaluation and the int8 comparison
    return qat


def run_qat(run: Run | str | Path, cfg: EdgeftConfig | None = None, scope=None, epochs: int | None = None,
            compare: bool | None = None, reports: bool | None = None) -> dict:
    """QAT on RUN/model.keras; saves RUN/model_qat.weights.h5 (+ model_qat.json), `qat` history
    rows, TensorBoard logs (RUN/logs/qat) and metrics["qat"], then (compare) prints PTQ vs QAT int8
    files side by side, and (`reports`; default: when no scope is given, i.e. `edgeft qat` rather
    than finetune's pipeline, which writes them at its end) writes report.md and curves.png again.
    Holds the run's lock (edgeft.core.lock) throughout."""
    from edgeft.core.lock import run_lock

    run = as_run(run, cfg)
    with run_lock(run.path, "qat"):
        metrics = _run_qat(run, scope, epochs, compare)
        if reports if reports is not None else scope is None:
            from edgeft.train.report import write_reports

            write_reports(run.path, run.model, run.splits, run.read_json(rundir.METRICS, {}), run.cfg)
            log.info(f"qat: {run.file(rundir.REPORT)} and curves.png updated")
        return metrics


def _run_qat(run: Run, scope, epochs: int | None, compare: bool | None) -> dict:
    from edgeft.data.datasets import representative_images
    from edgeft.train.distribute import make_scope
    from edgeft.train.report import evaluate_arrays, evaluate_test

    cfg = run.cfg
    epochs = cfg.qat.qat_epochs if epochs is None else epochs
    if epochs < 1:
        raise UserError("QAT needs at least 1 epoch")
    ok, note = qat_supported(cfg, run.model)
    if not ok:
        log.info(f"qat: skipped: {note}")
        return {"skipped": note}
    stage(f"qat: quantization-aware training, {epochs} epoch(s), lr {cfg.qat.lr_qat:g}"
          + (f", ranges frozen for the last {min(cfg.qat.qat_freeze_epochs, epochs)}"
             if cfg.qat.qat_freeze_epochs else ""))
    log.debug(f"qat: of {run.path}")
    # QAT is float32 only, so `edgeft qat` on a --mixed-precision run needs no GPU
    scope = scope or make_scope(dataclasses.replace(cfg.train, mixed_precision=False))
    splits = run.splits
    if cfg.train.mixed_precision:
        log.info("qat: runs in float32 (tfmot's fake-quantization is float32 only; --mixed-precision ends here)")
    granularity = cfg.export.int8_granularity
    rep = representative_images(splits.train, cfg.export.rep_samples, cfg.train.seed)
    t0 = time.time()
    with float32_policy():
        qat = train_qat_model(load_model(run.model_path), cfg, scope, splits.train, splits.val, len(splits.classes),
                              rep, epochs, [EpochLog(run.path, "qat"),
                                            keras.callbacks.TensorBoard(str(run.path / rundir.LOGS / "qat"))])
        metrics = evaluate_arrays(qat, splits.val, splits.classes) | {"seconds": round(time.time() - t0, 2),
                                                                       "epochs": epochs, "granularity": granularity}
        test = evaluate_test(qat, splits, stage="qat")
        if test:
            metrics["test"] = test
    # every worker saves (into its own directory: `run` is a temporary one on non-chief workers)
    with rundir.atomic_path(run.file(QAT_WEIGHTS), suffix=".weights.h5") as tmp:
        qat.save_weights(str(tmp))
    rundir.write_json(run.file(QAT_INFO), {"granularity": granularity, "epochs": epochs, "lr": cfg.qat.lr_qat,
                                       "freeze_epochs": min(cfg.qat.qat_freeze_epochs, epochs),
                                       "calibration_images": len(rep)})
    log.info(f"qat: val_accuracy {metrics['val_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}")
    if cfg.qat.qat_compare if compare is None else compare:
        metrics["int8_comparison"] = compare_int8(load_model(run.model_path), qat, rep, splits, cfg)
    run.update_metrics(qat=metrics)
    return metrics


def compare_int8(model, qat, rep, splits, cfg: EdgeftConfig) -> dict:
    """PTQ int8 file vs QAT Keras vs QAT int8 file on the parity inputs, printed side by side,
    with the decision `edgeft export --int8-source auto` takes (edgeft.quantize.int8_choice.choose)."""
    from edgeft.data.datasets import gate_inputs
    from edgeft.quantize.int8_choice import build_candidates, choose, keras_probs, qat_gain, why_shipped
    from edgeft.core.stats import group_bootstrap

    inputs = gate_inputs(splits.val, cfg)
    cands = build_candidates(model, qat, rep, inputs, cfg.export.int8_io, cfg.export.int8_granularity,
                             cfg.parity, cfg.train.seed)
    n, groups = len(inputs.y), inputs.source
    n_img = len(np.unique(groups))

    def acc_line(correct) -> str:
        a, lo, hi = group_bootstrap(correct, np.ones(n), groups)
        return f"{a:.1%} [{lo:.1%}, {hi:.1%}]"

    keras_ok = {"keras_float": keras_probs(model, inputs.x).argmax(-1) == inputs.y,
                "keras_qat": keras_probs(qat, inputs.x).argmax(-1) == inputs.y}
    acc = {k: float(np.mean(v)) for k, v in keras_ok.items()}
    log.info(f"qat: accuracy by LiteRT on {n} parity inputs ({n_img} validation images and copies)")
    log.info(f"  {'model':<26} {'accuracy [95 %]':<24} gate (against its source model)")
    log.info(f"  {'Keras float':<26} {acc_line(keras_ok['keras_float']):<24} -")
    log.info(f"  {'Keras QAT (simulation)':<26} {acc_line(keras_ok['keras_qat']):<24} -")
    for c in cands:
        label = f"int8 TFLite from {c.source.upper()}"
        j = c.judgement
        floor = j.floor
        fid = (f"; with QAT Keras {floor['source_agreement']:.1%} vs the file with itself {floor['agreement']:.1%} "
               f"({floor['how']}, {floor['n']} inputs)" if c.source == "qat" and floor else "")
        gate = "passes" if not c.failures else "FAILS: " + "; ".join(c.failures)
        log.info(f"  {label:<26} {acc_line(c.correct):<24} {gate if len(gate) < 40 else gate[:37] + '...'}")
        log.debug(f"  {label}: {gate} (drop {j.accuracy_drop_points:.1f} points, clear agreement "
                  f"{j.clear_agreement:.1%}{fid})")
    best = choose(cands)
    gain = qat_gain(cands, groups)
    if gain is None:
        verdict = "no QAT candidate"
    else:
        d, lo, hi = gain
        log.info(f"qat: QAT int8 minus PTQ int8, paired on the same inputs: {d:+.1f} points "
                 f"[95 % {lo:+.1f}, {hi:+.1f}]")
        verdict = ("QAT paid for itself: `edgeft export` ships its int8 file" if best.source == "qat" else
                   "QAT is not clearly better: `edgeft export` (int8 source auto) ships PTQ")
    log.info(f"qat: {verdict}")
    return acc | {"n": n, "n_images": int(n_img), "candidates": [c.summary() for c in cands], "better": best.source,
                  "qat_gain_points": None if gain is None else list(gain), "why": why_shipped(cands, best)}
