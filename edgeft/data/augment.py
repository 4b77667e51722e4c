"""Training augmentation: the named policies, batched tf.image ops on float32 pixels 0-255.

A policy is applied to training batches only (stage 1's cached views, stage 2, QAT), never to
evaluation, calibration or export. Random resized crop, flip and brightness / contrast are one
`tf.image.crop_and_resize` per batch plus arithmetic: tf_keras has no RandomResizedCrop layer, and
a mirrored crop is the same call with the box's x edges swapped.

Every random number comes from a `uniforms` array (one row per image, UNIFORMS columns), so the
cached views are reproducible and their flips known (`flipped`), and the online pipeline draws the
rows from a `tf.random.Generator` whose state persists across epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

UNIFORMS = 7   # area, aspect, x, y, flip, brightness, contrast


@dataclass(frozen=True)
class Policy:
    name: str
    area: tuple[float, float] = (1.0, 1.0)      # crop area, fraction of the image
    aspect: tuple[float, float] = (1.0, 1.0)    # crop aspect ratio (w / h)
    flip: bool = False                           # mirrored half the time
    brightness: float = 0.0                      # +- pixel levels
    contrast: tuple[float, float] = (1.0, 1.0)  # factor around the image's mean

    @property
    def mirrors(self) -> bool:
        return self.flip

    @property
    def active(self) -> bool:
        return self.name != "none"


# photo: random resized crop with area 0.4-1 (MediaPipe Model Maker uses 0.08-1 and Ultralytics
# 0.5-1 at 224 px and up; edge models run at 32-224 px, where a 0.08 crop is a few pixels), aspect
# 3/4-4/3 (both), horizontal flip (both), brightness +-25 levels and contrast 0.8-1.25 (MediaPipe's
# colour jitter). Not measured on photos here: no photo data set is reachable offline.
PHOTO = Policy("photo", area=(0.4, 1.0), aspect=(3 / 4, 4 / 3), flip=True, brightness=25.0, contrast=(0.8, 1.25))
POLICIES = {
    "photo": PHOTO,
    "upright": Policy("upright", PHOTO.area, PHOTO.aspect, False, PHOTO.brightness, PHOTO.contrast),
    "none": Policy("none"),
    # earlier versions' --augment (Keras layers, run by `keras_layers_augment`)
    "flip-rotate-zoom": Policy("flip-rotate-zoom", flip=True),
}


def policy(name: str) -> Policy:
    if name not in POLICIES:
        from edgeft.core.errors import UserError
        raise UserError(f"unknown augmentation policy {name!r} (one of: auto, {', '.join(POLICIES)})")
    return POLICIES[name]


def flips(p: Policy, uniforms: np.ndarray) -> np.ndarray:
    """Which images of a batch `p` mirrors, from the same uniforms `augment_batch` uses."""
    return (uniforms[:, 4] < 0.5) if p.flip else np.zeros(len(uniforms), bool)


def augment_batch(x, uniforms, p: Policy):
    """`x` float32 [n, h, w, 3] pixels 0-255 -> the same shape, augmented by `p` with `uniforms`
    ([n, UNIFORMS] in [0, 1))."""
    from edgeft._keras import tf

    if p.name == "none":
        return x
    u = tf.cast(uniforms, tf.float32)
    size = tf.shape(x)[1:3]
    lo_a, hi_a = p.area
    area = lo_a + (hi_a - lo_a) * u[:, 0]
    log_r = math.log(p.aspect[0]) + (math.log(p.aspect[1]) - math.log(p.aspect[0])) * u[:, 1]
    r = tf.exp(log_r)
    w = tf.minimum(1.0, tf.sqrt(area * r))
    h = tf.minimum(1.0, tf.sqrt(area / r))
    x0 = (1.0 - w) * u[:, 2]
    y0 = (1.0 - h) * u[:, 3]
    x1 = x0 + w
    if p.flip:   # a box with x1 < x0 is sampled mirrored
        mirror = u[:, 4] < 0.5
        x0, x1 = tf.where(mirror, x1, x0), tf.where(mirror, x0, x1)
    # crop_and_resize samples box corners at pixel centres: edge pixels map to 0 and 1 exactly
    boxes = tf.stack([y0, x0, y0 + h, x1], axis=1)
    out = tf.image.crop_and_resize(x, boxes, tf.range(tf.shape(x)[0]), size, method="bilinear")
    if p.contrast != (1.0, 1.0):
        c = p.contrast[0] + (p.contrast[1] - p.contrast[0]) * u[:, 6]
        mean = tf.reduce_mean(out, axis=[1, 2, 3], keepdims=True)
        out = (out - mean) * c[:, None, None, None] + mean
    if p.brightness:
        out = out + (2.0 * u[:, 5] - 1.0)[:, None, None, None] * p.brightness
    return tf.clip_by_value(out, 0.0, 255.0)


def keras_layers_augment(seed: int):
    """Earlier versions' --augment: Keras' RandomFlip / RandomRotation / RandomZoom."""
    from edgeft._keras import keras

    return keras.Sequential([keras.layers.RandomFlip("horizontal", seed=seed),
                             keras.layers.RandomRotation(0.08, seed=seed),
                             keras.layers.RandomZoom(0.1, seed=seed)], name="augment")


def online(ds, name: str, seed: int):
    """A tf.data pipeline of (float32 pixels, label) batches augmented afresh every epoch."""
    from edgeft._keras import tf

    if name in (None, "none", False):
        return ds
    if name is True or name == "flip-rotate-zoom":
        aug = keras_layers_augment(seed)
        return ds.map(lambda a, b: (aug(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
    p = policy(name)
    gen = tf.random.Generator.from_seed(seed)   # a variable: its state moves on across epochs

    def apply(a, b):
        return augment_batch(a, gen.uniform([tf.shape(a)[0], UNIFORMS]), p), b
    return ds.map(apply, num_parallel_calls=1)   # one thread: the generator's sequence is repeatable


def view_uniforms(n: int, seed: int, view: int) -> np.ndarray:
    """The random numbers of view `view` (>= 1) of `n` images: reproducible from the seed."""
    return np.random.default_rng([seed, 7919, view]).random((n, UNIFORMS), dtype=np.float32)
