"""The default recipe's rules that depend on the data: how many cached views, how many epochs,
class weights, the learning-rate schedules. Each rule's reason is in docs/training.md.

Every value a rule picks is written into the run's config.yaml, so `--config RUN/config.yaml`
repeats the run and `--resume`, QAT and export read what training actually did.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from edgeft.core.config import EdgeftConfig

# Stage 1 on cached features costs one backbone pass per view of every training image. The rule
# keeps stage 1 within 2x of a single pass (docs/training.md, measured by tools/bench_recipe.py):
# the passes are cheap next to stage 1's fixed cost on small folders, and dominate on large ones.
VIEWS_BY_SIZE = ((600, 4), (1500, 3))   # up to n training images: K views; above the last: 2
HEAD_STEPS = 300                          # stage 1 optimizer steps to aim at (features are cheap)
HEAD_EPOCHS = (5, 30)
FINETUNE_STEPS = 300                      # stage 2 steps to aim at (each runs the backbone)
FINETUNE_EPOCHS = (3, 12)
IMBALANCE = 3.0                           # largest / smallest class above this: balanced weights


# ... and the extra views may cost at most this many multiply-accumulates in all (VGG16 at 224 px:
# 15.5 G a view of an image, so 290 images get one view and stage 1 stays one backbone pass, >= 5x
# faster than the seed's 10-epoch loop; EfficientNet-Lite0 at 224 px, 0.39 G, keeps 4 views up to 600
# images). docs/training.md, "Stage 1 stays cached".
EXTRA_VIEW_MACS = 2e12


def views_for(n_train: int, macs_per_image: float | None = None) -> int:
    k = next((k for limit, k in VIEWS_BY_SIZE if n_train <= limit), 2)
    if macs_per_image:
        while k > 1 and (k - 1) * n_train * macs_per_image > EXTRA_VIEW_MACS:
            k -= 1
    return k


def backbone_macs(model) -> float:
    """Multiply-accumulates of one image through the model's convolutions and dense layers (the
    backbone's cost; the head's Dense adds little), from the layers' kernels and output shapes."""
    total = 0.0

    def walk(layers):
        nonlocal total
        for layer in layers:
            if hasattr(layer, "layers"):   # a nested backbone model
                walk(layer.layers)
                continue
            kind = type(layer).__name__
            kernel = getattr(layer, "kernel", None) if kind != "DepthwiseConv2D" else getattr(layer, "depthwise_kernel", None)
            if kernel is None:
                continue
            shape = layer.output_shape if not isinstance(layer.output_shape, list) else layer.output_shape[0]
            positions = float(np.prod([d for d in shape[1:-1] if d])) if len(shape) > 2 else 1.0
            total += positions * float(np.prod(kernel.shape))
    walk(model.layers)
    return total


def _clamp(v: int, lo_hi: tuple[int, int]) -> int:
    return max(lo_hi[0], min(lo_hi[1], v))


def head_epochs_for(rows: int, batch: int) -> int:
    return _clamp(math.ceil(HEAD_STEPS / max(1, math.ceil(rows / batch))), HEAD_EPOCHS)


def finetune_epochs_for(n_train: int, batch: int) -> int:
    return _clamp(math.ceil(FINETUNE_STEPS / max(1, math.ceil(n_train / batch))), FINETUNE_EPOCHS)


def imbalance(y: np.ndarray, n_classes: int) -> float:
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_classes)
    counts = counts[counts > 0]
    return float(counts.max() / counts.min()) if len(counts) else 1.0


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (classes x n_class) for every class (Keras' and scikit-learn's "balanced")."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 1.0)


def class_weight_dict(cfg: EdgeftConfig, y: np.ndarray, n_classes: int) -> dict | None:
    mode = cfg.train.class_weight
    if mode == "auto":
        mode = "balanced" if imbalance(y, n_classes) > IMBALANCE else "none"
    if mode != "balanced":
        return None
    return {i: float(w) for i, w in enumerate(balanced_weights(y, n_classes))}


def resolve_for_data(cfg: EdgeftConfig, n_train: int, y_train: np.ndarray, n_classes: int,
                     macs_per_image: float | None = None) -> EdgeftConfig:
    """The data-dependent values known before stage 1: views (by the folder's size and, given
    `macs_per_image`, the backbone's cost), class weights, stage 2 epochs.
    (Augmentation policy, label smoothing and the head's learning rate are chosen on the cached
    features, `train.choose`; stage 1 epochs follow the rows the chosen policy keeps.)"""
    d, t = cfg.data, cfg.train
    views = d.augment_views
    if d.augment_policy == "none":
        views = 1
    elif views is None:
        views = views_for(n_train, macs_per_image)
    weights = t.class_weight
    if weights == "auto":
        weights = "balanced" if imbalance(y_train, n_classes) > IMBALANCE else "none"
    ft = t.finetune_epochs if t.finetune_epochs is not None else finetune_epochs_for(n_train, d.batch_size)
    return replace(cfg, data=replace(d, augment_views=views),
                   train=replace(t, class_weight=weights, finetune_epochs=ft))


def lr_schedule(lr: float, total_steps: int, warmup: float, kind: str):
    """The learning rate of a stage: linear warm-up over `warmup` of the steps, then cosine decay
    to 0 ("cosine") or constant; a plain float when neither applies (the seed's Adam(1e-4))."""
    from edgeft._keras import keras

    warm = int(warmup * total_steps)
    if kind == "cosine":
        return keras.optimizers.schedules.CosineDecay(0.0 if warm else lr, max(1, total_steps - warm),
                                                      warmup_target=lr if warm else None, warmup_steps=warm)
    if warm:   # constant after the warm-up: a cosine that decays to alpha = 1 (itself)
        return keras.optimizers.schedules.CosineDecay(0.0, max(1, total_steps - warm), alpha=1.0,
                                                      warmup_target=lr, warmup_steps=warm)
    return lr
