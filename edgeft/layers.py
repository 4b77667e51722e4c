"""The preprocessing layer that lives inside every edgeft model.

Every exported format takes raw RGB pixels 0-255, so nobody re-implements `preprocess_input` on
the device. Registered so `.keras` files load with safe_mode on.
"""
from __future__ import annotations

from edgeft._keras import keras, tf

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("tf", "tf8", "caffe", "torch")
# "tf8" is "tf" on an 8-bit grid: (x - 128) / 128 instead of x / 127.5 - 1 (at most 1/128 apart).
# Every pixel then maps to an exact int8 value, where x / 127.5 - 1 falls half-way between two
# levels for every pixel and the simulation's and the kernels' rounding disagree. QAT models use
# it (see qat.build_qat_model); float models keep "tf", what the pretrained weights expect.


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
        if self.mode == "tf8":
            # the intermediate gets its own fixed 8-bit range, so the converter keeps it exact
            # instead of calibrating it (pixel - 128 is an integer in [-128, 127]: scale 1)
            centred = tf.quantization.fake_quant_with_min_max_args(x - 128.0, min=-128.0, max=127.0, num_bits=8)
            return centred * (1.0 / 128.0)
        if self.mode == "torch":
            return (x / 255.0 - tf.constant(_TORCH_MEAN, x.dtype)) / tf.constant(_TORCH_STD, x.dtype)
        # caffe: RGB -> BGR, then subtract the ImageNet mean (no scaling)
        return tf.reverse(x, axis=[-1]) - tf.constant(_CAFFE_MEAN_BGR, x.dtype)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def preprocess_output_range(mode: str) -> tuple[float, float]:
    """The exact [min, max] the Preprocess layer can output for pixels in [0, 255] (all channels)."""
    if mode == "tf":
        return -1.0, 1.0
    if mode == "tf8":
        return -1.0, 127.0 / 128.0
    if mode == "torch":
        lo = [(0.0 - m) / s for m, s in zip(_TORCH_MEAN, _TORCH_STD)]
        hi = [(1.0 - m) / s for m, s in zip(_TORCH_MEAN, _TORCH_STD)]
        return min(lo), max(hi)
    if mode == "caffe":
        return -max(_CAFFE_MEAN_BGR), 255.0 - min(_CAFFE_MEAN_BGR)
    raise ValueError(f"unknown preprocessing mode {mode!r}")


@keras.saving.register_keras_serializable(package="edgeft")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing on integer labels (tf_keras'
    SparseCategoricalCrossentropy has no label_smoothing): the labels become one-hot inside the
    loss, so every data pipeline (stage 1's features, stage 2, QAT, multi-worker shards) keeps its
    integer labels and Keras' "accuracy" stays the sparse one."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        depth = tf.shape(y_pred)[-1]
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        onehot = tf.one_hot(labels, depth, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(onehot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def training_loss(label_smoothing: float | None):
    """The loss of every training stage: Keras' own sparse cross-entropy without smoothing (what
    runs made before label smoothing compiled), SmoothedSparseCrossentropy with it."""
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    return SmoothedSparseCrossentropy(label_smoothing)
