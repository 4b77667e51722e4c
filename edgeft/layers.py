"""The preprocessing layer that lives inside every edgeft model.

Every exported format takes raw RGB pixels 0-255, so nobody re-implements `preprocess_input` on
the device. Registered so `.keras` files load with safe_mode on.
"""
from __future__ import annotations

from ._keras import keras, tf

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("tf", "caffe", "torch")


@keras.saving.register_keras_serializable(package="edgeft")
class Preprocess(keras.layers.Layer):
    """RGB 0-255 -> what the backbone's pretrained weights expect (keras `preprocess_input`)."""

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = tf.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - tf.constant(_TORCH_MEAN, x.dtype)) / tf.constant(_TORCH_STD, x.dtype)
        # caffe: RGB -> BGR, then subtract the ImageNet mean (no scaling)
        return tf.reverse(x, axis=[-1]) - tf.constant(_CAFFE_MEAN_BGR, x.dtype)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
