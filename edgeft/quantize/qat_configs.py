"""tensorflow-model-optimization pieces that make the QAT model simulate the file TFLite writes.

tfmot's default 8-bit scheme differs from what the TFLite converter writes in two places, so a
QAT model trained with it learns a model that is not the one shipped:

- DepthwiseConv2D weights: tfmot quantizes them with one range per *last* axis of the kernel
  [kh, kw, C, M], which is M = 1 for MobileNets, i.e. per tensor (tensorflow/model-optimization
  #808); the converter writes one scale per output channel (C * M). `DepthwisePerChannelQuantizer`
  quantizes per output channel, as the file does.
- The Preprocess layer (raw 0-255 pixels -> the backbone's range) is not annotated by default, so
  the first convolution's input is never fake-quantized in training while the file quantizes it.
  `FixedRangeQuantizeConfig` gives its output a fixed range: the exact range pixels 0-255 map to.

Imported lazily (tfmot is only needed for QAT).
"""
from __future__ import annotations

import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quantizers
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry as registry,
    default_8bit_quantize_scheme as scheme,
)

from edgeft._keras import keras, tf


class DepthwisePerChannelQuantizer(quantizers.LastValueQuantizer):
    """Depthwise kernel [kh, kw, C, M]: symmetric, narrow-range, one range per output channel."""

    def __init__(self, **_ignored):
        super().__init__(num_bits=8, per_axis=True, symmetric=True, narrow_range=True)

    def build(self, tensor_shape, name, layer):
        n = int(tensor_shape[2]) * int(tensor_shape[3])
        lo = layer.add_weight(name + "_min", shape=(n,), initializer=keras.initializers.Constant(-6.0),
                              trainable=False)
        hi = layer.add_weight(name + "_max", shape=(n,), initializer=keras.initializers.Constant(6.0),
                              trainable=False)
        return {"min_var": lo, "max_var": hi}

    def __call__(self, inputs, training, weights, **kwargs):
        kh, kw, c, m = inputs.shape
        flat = tf.reshape(inputs, (kh, kw, 1, c * m))   # output channel c*M + m is the last axis
        return tf.reshape(super().__call__(flat, training, weights, **kwargs), (kh, kw, c, m))

    def get_config(self):
        return {}


class DepthwisePerChannelQuantizeConfig(registry.Default8BitConvQuantizeConfig):
    def __init__(self, weight_attrs=("depthwise_kernel",), activation_attrs=("activation",),
                 quantize_output=False):
        super().__init__(list(weight_attrs), list(activation_attrs), quantize_output)
        self.weight_quantizer = DepthwisePerChannelQuantizer()


class FixedRangeQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """A weightless layer whose output is quantized over a fixed, known range."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = float(lo), float(hi)

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [quantizers.FixedQuantizer(num_bits=8, init_min=self.lo, init_max=self.hi, narrow_range=False)]

    def get_config(self):
        return {"lo": self.lo, "hi": self.hi}


class _PerChannelRegistry(registry.Default8BitQuantizeRegistry):
    def __init__(self):
        super().__init__(disable_per_axis=False)
        self._layer_quantize_map[keras.layers.DepthwiseConv2D] = DepthwisePerChannelQuantizeConfig()


class PerChannelScheme(scheme.Default8BitQuantizeScheme):
    """tfmot's default 8-bit scheme with depthwise weights per output channel, as TFLite writes them."""

    def get_quantize_registry(self):
        return _PerChannelRegistry()


def quantize_scheme(granularity: str, depthwise_per_channel: bool = True):
    """per-channel: Conv2D and DepthwiseConv2D weights per output channel (TFLite's default);
    per-tensor: one range per weight tensor (for accelerators and DSPs that need it).
    depthwise_per_channel=False is tfmot's own default scheme (measurements only)."""
    if granularity == "per-tensor":
        return scheme.Default8BitQuantizeScheme(disable_per_axis=True)
    return PerChannelScheme() if depthwise_per_channel else scheme.Default8BitQuantizeScheme()


def custom_objects() -> dict:
    return {"DepthwisePerChannelQuantizer": DepthwisePerChannelQuantizer,
            "DepthwisePerChannelQuantizeConfig": DepthwisePerChannelQuantizeConfig,
            "FixedRangeQuantizeConfig": FixedRangeQuantizeConfig}
