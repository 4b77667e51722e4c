"""Quantization-aware training of a fine-tuned run (tensorflow-model-optimization).

The flat model is annotated layer by layer, leaving out the input and the `Preprocess` layer
(it scales raw pixels; TFLite quantizes its output like any activation), then `quantize_apply`
inserts fake-quant ops. BatchNorm stays frozen, as in stage 2. Backbones QAT breaks on
(MobileNetV3's hard-swish) are reported and left to post-training quantization.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from . import rundir
from ._keras import keras
from .config import EdgeftConfig, from_yaml_file
from .errors import UserError
from .layers import Preprocess
from .model import custom_objects, float32_policy, is_batchnorm, load_model
from .registry import get_backbone

# Saved as weights and rebuilt from model.keras: tfmot's wrappers do not round-trip through the
# .keras format (variable order differs on load: "expected 4 variables, received 5").
QAT_WEIGHTS = "model_qat.weights.h5"


def _tfmot():
    import tensorflow_model_optimization as tfmot

    return tfmot


def build_qat_model(model: keras.Model) -> keras.Model:
    """A quantization-aware copy of the flat float model (weights carried over)."""
    tfmot = _tfmot()
    qk = tfmot.quantization.keras

    def annotate(layer):
        if isinstance(layer, (keras.layers.InputLayer, Preprocess)):
            return layer.__class__.from_config(layer.get_config())
        return qk.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()))

    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with qk.quantize_scope(custom_objects()):
        qat = qk.quantize_apply(annotated)
    for layer in qat.layers:   # keep BatchNorm in inference mode, as in stage 2
        inner = getattr(layer, "layer", layer)
        if is_batchnorm(inner):
            layer.trainable = False
    return qat


def load_qat_model(run: str | Path) -> keras.Model | None:
    """The run's QAT model, or None when QAT was not run."""
    run = Path(run)
    if not (run / QAT_WEIGHTS).is_file():
        return None
    qat = build_qat_model(load_model(run / "model.keras"))
    qat.load_weights(str(run / QAT_WEIGHTS))
    return qat


def qat_supported(cfg: EdgeftConfig) -> tuple[bool, str]:
    bb = get_backbone(cfg.model.backbone)
    return bb.qat, bb.qat_note


def run_qat(run: Path, cfg: EdgeftConfig | None = None, splits=None, scope=None, epochs: int | None = None) -> dict:
    """QAT on RUN/model.keras; saves RUN/model_qat.weights.h5, `qat` history rows, metrics["qat"]."""
    from .data import run_splits
    from .distribute import make_scope
    from .report import evaluate_arrays
    from .training import EpochLog

    run = Path(run)
    if not (run / "model.keras").is_file():
        raise UserError(f"{run} is not a finished edgeft run (no model.keras)")
    cfg = cfg or from_yaml_file(run / "config.yaml")
    epochs = cfg.qat.qat_epochs if epochs is None else epochs
    if epochs < 1:
        raise UserError("QAT needs at least 1 epoch")
    ok, note = qat_supported(cfg)
    if not ok:
        print(f"qat: skipped: {note}")
        return {"skipped": note}
    # QAT is float32 only, so `edgeft qat` on a --mixed-precision run needs no GPU
    scope = scope or make_scope(dataclasses.replace(cfg.train, mixed_precision=False))
    if splits is None:
        splits = run_splits(cfg)
    from .data import make_dataset

    if cfg.train.mixed_precision:
        print("qat: runs in float32 (tfmot's fake-quantization is float32 only; --mixed-precision ends here)")
    t0 = time.time()
    with float32_policy():
        with scope.strategy.scope():
            qat = build_qat_model(load_model(run / "model.keras"))
            qat.compile(keras.optimizers.Adam(cfg.qat.lr_qat), "sparse_categorical_crossentropy", ["accuracy"])
        batch = cfg.data.batch_size * scope.replicas
        qat.fit(scope.distribute(make_dataset(splits.train.x, splits.train.y, batch, True, cfg.data.augment,
                                              cfg.train.seed)),
                validation_data=scope.distribute(make_dataset(splits.val.x, splits.val.y, batch)),
                epochs=epochs, callbacks=[EpochLog(run, "qat")], verbose=2)
        metrics = evaluate_arrays(qat, splits.val, splits.classes) | {"seconds": round(time.time() - t0, 2),
                                                                       "epochs": epochs}
    # every worker saves (into its own directory: `run` is a temporary one on non-chief workers)
    with rundir.atomic_path(run / QAT_WEIGHTS, suffix=".weights.h5") as tmp:
        qat.save_weights(str(tmp))
    all_metrics = rundir.read_json(run / "metrics.json", {})
    all_metrics["qat"] = metrics
    rundir.write_json(run / "metrics.json", all_metrics)
    print(f"qat: val_accuracy {metrics['val_accuracy']:.4f}  val_loss {metrics['val_loss']:.4f}")
    return metrics
