"""The preprocessing layer that lives inside every edgeft model.

Every exported format takes raw RGB pixels 0-255, so nobody re-implements `preprocess_input` on
the device. Registered so `.keras` files load with safe_mode on.
"""
from __future__ import annotations

from edgeft._keras import keras, tf

__all__ = ["Preprocess", "MODES", "exact8", "preprocess_output_range", "SmoothedSparseCrossentropy", "training_loss"]

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
MODES = ("tf", "tf8", "caffe", "torch", "mean_std", "mean_std8")
# "tf8" is "tf" on an 8-bit grid: (x - 128) / 128 instead of x / 127.5 - 1 (at most 1/128 apart).
# Every pixel then maps to an exact int8 value, where x / 127.5 - 1 falls half-way between two
# levels for every pixel and the simulation's and the kernels' rounding disagree. QAT models use
# it (see qat.build_qat_model); float models keep "tf", what the pretrained weights expect.
# "mean_std": (x - mean) / std per channel, in pixel units (EfficientNet-Lite: mean 127, std 128).
# "mean_std8" is the same values with x - mean pinned to its own integer 8-bit range: exact when
# the mean is one integer and the std one number for every channel (see `qat_form`).


@keras.saving.register_keras_serializable(package="edgeft")
class Preprocess(keras.layers.Layer):
    """RGB 0-255 -> what the backbone's pretrained weights expect (keras `preprocess_input`)."""

    def __init__(self, mode: str = "tf", mean=None, std=None, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        if mode.startswith("mean_std"):
            if not (self.mean and self.std and len(self.mean) == len(self.std) == 3 and all(s > 0 for s in self.std)):
                raise ValueError("mean_std preprocessing needs 3 means and 3 positive stds")
            if mode == "mean_std8" and not exact8(self.mean, self.std):
                raise ValueError("mean_std8 needs one integer mean and one std for every channel")

    def qat_form(self) -> "Preprocess":
        """The layer QAT puts in its place: the same values on an exact 8-bit grid where there is
        one ("tf" -> "tf8", "mean_std" with one integer mean -> "mean_std8"), else the same layer."""
        mode = {"tf": "tf8"}.get(self.mode, self.mode)
        if self.mode == "mean_std" and exact8(self.mean, self.std):
            mode = "mean_std8"
        return Preprocess(mode, self.mean, self.std, name=self.name)

    def call(self, x):
        x = tf.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "tf8":
            # the intermediate gets its own fixed 8-bit range, so the converter keeps it exact
            # instead of calibrating it (pixel - 128 is an integer in [-128, 127]: scale 1)
            centred = tf.quantization.fake_quant_with_min_max_args(x - 128.0, min=-128.0, max=127.0, num_bits=8)
            return centred * (1.0 / 128.0)
        if self.mode == "mean_std":
            return (x - tf.constant(self.mean, x.dtype)) / tf.constant(self.std, x.dtype)
        if self.mode == "mean_std8":
            m = self.mean[0]
            centred = tf.quantization.fake_quant_with_min_max_args(x - m, min=-m, max=255.0 - m, num_bits=8)
            return centred * (1.0 / self.std[0])
        if self.mode == "torch":
            return (x / 255.0 - tf.constant(_TORCH_MEAN, x.dtype)) / tf.constant(_TORCH_STD, x.dtype)
        # caffe: RGB -> BGR, then subtract the ImageNet mean (no scaling)
        return tf.reverse(x, axis=[-1]) - tf.constant(_CAFFE_MEAN_BGR, x.dtype)

    def get_config(self):
        extra = {"mean": list(self.mean), "std": list(self.std)} if self.mean is not None else {}
        return {**super().get_config(), "mode": self.mode, **extra}


def exact8(mean, std) -> bool:
    """(x - mean) / std is exact on an 8-bit grid: x - mean an integer in a 256-value range (one
    integer mean for every channel), then one scale (one std)."""
    return len(set(mean)) == 1 and float(mean[0]).is_integer() and 0 <= mean[0] <= 255 and len(set(std)) == 1


def preprocess_output_range(mode: str, mean=None, std=None) -> tuple[float, float]:
    """The exact [min, max] the Preprocess layer can output for pixels in [0, 255] (all channels)."""
    if mode in ("mean_std", "mean_std8"):
        return (min((0.0 - m) / s for m, s in zip(mean, std)), max((255.0 - m) / s for m, s in zip(mean, std)))
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
