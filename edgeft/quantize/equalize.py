"""Cross-layer equalization and bias correction for per-tensor int8 (issue 30 item 4(b)).

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction":

- **BatchNorm folding** (`fold_batchnorm`): each inference BatchNorm after a Conv2D / DepthwiseConv2D
  / Dense is folded into that layer's kernel and bias, in a copy of the model (the converter folds
  it too; equalization needs the folded kernels to see the ranges the converter will quantize).
- **Cross-layer equalization** (sec. 4.1): for a pair conv1 -> activation -> conv2 (a depthwise in
  the middle of a chain makes two pairs, equalized in turn, `ITERATIONS` times), output channel i of
  conv1 is divided by s_i = sqrt(r1_i r2_i) / r2_i and input channel i of conv2 multiplied by it
  (r: per-channel weight range, max |w|); both channels' ranges become sqrt(r1_i r2_i), so one
  per-tensor scale fits every channel far better. Layers between the pair may be a folded
  BatchNorm, the activation, zero padding, pooling or dropout (each commutes with a positive
  per-channel scale); every one must feed the next alone.
- **ReLU6**: a positive scale commutes with ReLU, not with ReLU6: after conv1's channel i is divided
  by t_i (and conv2's input multiplied), that channel clips at 6 t_i in the original units. `RELU6`
  options, measured on EfficientNet-Lite0 fine-tuned on a real folder (docs/quantization.md):
  "replace" (ReLU6 -> ReLU on the scaled pairs: AIMET's and the paper's choice for MobileNetV2)
  breaks that model: ReLU6 -> ReLU alone, nothing scaled, takes its test accuracy from 0.80 to 0.36;
  "keep" (scaled, clip left at 6) breaks it further (0.10); "skip" (pairs through ReLU6 left alone)
  is exact but equalizes nothing there (every pair of MobileNetV2 / EfficientNet-Lite is one);
  **"clamp"** (the default) is exact on the calibration images: a channel whose ReLU6 input reaches 6
  on them keeps t_i = 1, any other channel takes t_i >= M_i / 6 (M_i its largest ReLU6 input), so its
  clip point stays above everything it was seen to get. A per-channel clip min(relu(x), 6 t_i) would
  be exact everywhere, but TFLite's fused activations (and its int8 kernels) clip a whole tensor at
  one value: it would need a per-channel MINIMUM op of its own in the int8 file.
- **Bias correction** (sec. 4.2, the empirical variant, AIMET's "empirical bias correction"): each
  layer's weights quantized per tensor (symmetric int8, scale max |w| / 127, as the converter does);
  the mean output shift E[(W_q - W) x] per output channel, x the layer's float input on the
  calibration images, is subtracted from its bias.

`equalized_model(model, rep_images)` does all three and returns the float Keras model that the
recovery candidate "equalization + bias correction" (edgeft.pipeline.recovery) converts per tensor.
Only flat functional models are rewritten (a nested model is a layer left as it is).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

ITERATIONS = 4          # sweeps over the pairs (a depthwise sits in two); the ranges settle within a few
RELU6 = ("replace", "clamp", "skip", "keep")
TRANSPARENT = {"ZeroPadding2D", "Dropout", "GlobalAveragePooling2D", "AveragePooling2D", "MaxPooling2D",
               "SpatialDropout2D"}
KINDS = {"Conv2D": "conv", "DepthwiseConv2D": "dw", "Dense": "dense"}


def _graph(model) -> tuple[dict, dict, dict]:
    """(layer name -> layer, name -> names of the layers it reads, name -> names reading it)."""
    layers = {layer.name: layer for layer in model.layers}
    ins: dict[str, list[str]] = {n: [] for n in layers}
    outs: dict[str, list[str]] = {n: [] for n in layers}
    for spec in model.get_config()["layers"]:
        for node in spec.get("inbound_nodes", []):
            for inbound in node:
                src = inbound[0] if isinstance(inbound, (list, tuple)) else inbound
                ins[spec["name"]].append(src)
                outs.setdefault(src, []).append(spec["name"])
    return layers, ins, outs


def _activation(layer) -> str | None:
    """"linear", "relu" or "relu6" for a layer that is one of them, else None."""
    name = type(layer).__name__
    if name == "ReLU":
        c = layer.get_config()
        if float(c.get("negative_slope") or 0) or float(c.get("threshold") or 0):
            return None
        mx = c.get("max_value")
        return "relu" if mx is None else ("relu6" if float(mx) == 6.0 else None)
    if name == "Activation":
        a = layer.get_config()["activation"]
        return {"linear": "linear", "relu": "relu", "relu6": "relu6"}.get(a)
    return None


def _fused(layer) -> str | None:
    act = layer.get_config().get("activation", "linear")
    return {"linear": "linear", "relu": "relu", "relu6": "relu6"}.get(act)


def _single(outs, name):
    return outs.get(name, [])[0] if len(outs.get(name, [])) == 1 else None


def plan(model) -> tuple[dict[str, str], list[tuple[str, str, str, list[str]]]]:
    """({BatchNorm name: the layer it folds into}, [(conv1, conv2, activation, ReLU6 layers between)])."""
    layers, ins, outs = _graph(model)
    folds = {}
    for n, layer in layers.items():
        if type(layer).__name__ == "BatchNormalization" and len(ins[n]) == 1:
            src = ins[n][0]
            axis = layer.get_config()["axis"]
            axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
            if (src in layers and type(layers[src]).__name__ in KINDS and _single(outs, src) == n
                    and axis in (-1, len(layer.input_shape) - 1) and _fused(layers[src]) == "linear"):
                folds[n] = src
    pairs = []
    for n, layer in layers.items():
        if type(layer).__name__ not in KINDS:
            continue
        act, relu6s, cur = _fused(layer), [], n
        if act is None:
            continue
        while True:
            nxt = _single(outs, cur)
            if nxt is None or len(ins[nxt]) != 1:
                break
            kind = type(layers[nxt]).__name__
            if kind in KINDS:
                pairs.append((n, nxt, act, relu6s))
                break
            a = _activation(layers[nxt])
            if nxt in folds:
                if act != "linear":   # a BatchNorm after the activation is not folded
                    break
            elif a is not None and act == "linear":
                act = a
                if a == "relu6":
                    relu6s = [nxt]
            elif a == "linear" or kind in TRANSPARENT:
                pass
            else:
                break
            cur = nxt
    return folds, pairs


def _clone(model, folds: dict, relu_for: set[str]):
    """The model with each folded BatchNorm an identity, every layer it folds into given a bias,
    and the ReLU6 layers in `relu_for` made ReLU; weights not set (see `_set`)."""
    from edgeft._keras import keras
    from edgeft.nn.model import custom_objects

    into = set(folds.values())

    def clone(layer):
        if layer.name in folds:
            return keras.layers.Activation("linear", name=layer.name)
        config = layer.get_config()
        if layer.name in into:
            config = config | {"use_bias": True, "bias_initializer": "zeros"}
        if layer.name in relu_for:
            return keras.layers.ReLU(name=layer.name)
        return layer.__class__.from_config(config)

    with keras.utils.custom_object_scope(custom_objects()):
        return keras.models.clone_model(model, clone_function=clone)


def _kernels(model, folds: dict) -> dict[str, list[np.ndarray]]:
    """{layer: [kernel, bias]} with every BatchNorm of `folds` folded in (float64)."""
    layers = {layer.name: layer for layer in model.layers}
    out = {}
    for n, layer in layers.items():
        if type(layer).__name__ in KINDS:
            w = [np.asarray(v, np.float64) for v in layer.get_weights()]
            k = w[0]
            b = w[1] if len(w) > 1 else np.zeros(_cout(KINDS[type(layer).__name__], k))
            out[n] = [k, b]
    for bn, src in folds.items():
        layer = layers[bn]
        c = layer.get_config()
        mean, var = (np.asarray(v, np.float64) for v in (layer.moving_mean, layer.moving_variance))
        gamma = np.asarray(layer.gamma, np.float64) if c.get("scale", True) else np.ones_like(mean)
        beta = np.asarray(layer.beta, np.float64) if c.get("center", True) else np.zeros_like(mean)
        a = gamma / np.sqrt(var + c["epsilon"])
        k, b = out[src]
        kind = KINDS[type(layers[src]).__name__]
        k = k * (a.reshape(k.shape[2], k.shape[3]) if kind == "dw" else a)
        out[src] = [k, (b - mean) * a + beta]
    return out


def _cout(kind: str, k: np.ndarray) -> int:
    return k.shape[2] * k.shape[3] if kind == "dw" else k.shape[-1]


def _out_ranges(kind: str, k: np.ndarray) -> np.ndarray:
    """max |w| per output channel (a depthwise kernel's channel i * multiplier + m)."""
    a = np.abs(k)
    return a.max(axis=(0, 1)).reshape(-1) if kind == "dw" else a.reshape(-1, k.shape[-1]).max(0)


def _in_ranges(kind: str, k: np.ndarray) -> np.ndarray:
    a = np.abs(k)
    return a.max(axis=1) if kind == "dense" else a.max(axis=(0, 1, 3))


def equalize_pairs(kernels: dict, kinds: dict[str, str], pairs, iterations: int = ITERATIONS,
                   bounds: dict | None = None) -> dict:
    """Nagel's s_i = sqrt(r1_i r2_i) / r2_i on each (conv1, conv2) pair, `iterations` sweeps, in place;
    returns {conv1: the product of its scales} (1 where a channel of either layer is all zero).
    `bounds`: {conv1: (lowest total scale per channel, channels whose total scale stays 1)} (ReLU6
    "clamp": see `relu6_bounds`)."""
    total, bounds = {}, bounds or {}
    for _ in range(iterations):
        for a, b, _act, _r in pairs:
            (k1, b1), (k2, b2) = kernels[a], kernels[b]
            r1, r2 = _out_ranges(kinds[a], k1), _in_ranges(kinds[b], k2)
            if r1.shape != r2.shape:   # a depthwise multiplier or a reshape between: not a channel pair
                continue
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 * r2) / np.where(r2 > 0, r2, 1), 1.0)
            if a in bounds:
                lo, fixed = bounds[a]
                t = total.get(a, 1.0)
                s = np.where(fixed, 1.0 / t, np.maximum(s, lo / t))
            k1 = k1 / (s.reshape(k1.shape[2], k1.shape[3]) if kinds[a] == "dw" else s)
            k2 = k2 * (s[:, None] if kinds[b] == "dense" else s[None, None, :, None])
            kernels[a], kernels[b] = [k1, b1 / s], [k2, b2]
            total[a] = total.get(a, 1.0) * s
    return total


def _set(copy, kernels: dict) -> None:
    for layer in copy.layers:
        if layer.name in kernels:
            k, b = kernels[layer.name]
            want = layer.get_weights()
            layer.set_weights([k.astype(np.float32), b.astype(np.float32)][:len(want)])


def _copy_weights(src, dst, skip: set[str]) -> None:
    by_name = {layer.name: layer for layer in src.layers}
    for layer in dst.layers:
        if layer.name not in skip and layer.weights:
            layer.set_weights(by_name[layer.name].get_weights())


def fold_batchnorm(model):
    """A copy of `model` with each foldable BatchNorm folded into the layer before it (same outputs
    up to float rounding); the BatchNorm layers stay as identities, by the same names."""
    folds, _ = plan(model)
    copy = _clone(model, folds, set())
    kernels = _kernels(model, folds)
    _copy_weights(model, copy, set(kernels) | set(folds))
    _set(copy, kernels)
    return copy


def relu6_bounds(model, pairs, images: np.ndarray, batch: int = 8) -> dict:
    """For ReLU6 "clamp": per pair through a ReLU6, the largest input each channel of that ReLU6 gets
    on `images` (M_i). Scaling conv1's channel by 1 / t_i moves its clip to 6 t_i in the original
    units: the outputs stay the same on these images where M_i < 6 and t_i >= M_i / 6; a channel
    that reaches 6 keeps t_i = 1. Returns {conv1: (M / 6, M >= 6)}."""
    from edgeft._keras import keras, tf

    through = [(a, r[0]) for a, _b, act, r in pairs if act == "relu6" and r]
    if not through:
        return {}
    feats = keras.Model(model.inputs, [model.get_layer(r).input for _a, r in through])
    top = [None] * len(through)
    for i in range(0, len(images), batch):
        xs = feats(np.asarray(images[i:i + batch], np.float32), training=False)
        xs = xs if isinstance(xs, (list, tuple)) else [xs]
        for j, x in enumerate(xs):
            m = np.asarray(tf.reduce_max(tf.reshape(x, [-1, x.shape[-1]]), 0), np.float64)
            top[j] = m if top[j] is None else np.maximum(top[j], m)
    return {a: (np.maximum(m, 0) / 6.0, m >= 6.0) for (a, _r), m in zip(through, top)}


def equalize(model, relu6: str = "clamp", iterations: int = ITERATIONS, images: np.ndarray | None = None):
    """A copy of `model` with its BatchNorms folded and its layer pairs equalized (module docstring);
    returns (the copy, its pairs equalized). `relu6`: one of RELU6 ("clamp" needs `images`)."""
    if relu6 not in RELU6:
        raise ValueError(f"relu6 must be one of {RELU6}, not {relu6!r}")
    folds, pairs = plan(model)
    if relu6 == "clamp" and images is None and any(p[2] == "relu6" for p in pairs):
        raise ValueError("relu6='clamp' needs the calibration images")
    if relu6 == "skip":
        pairs = [p for p in pairs if p[2] != "relu6"]
    kinds = {layer.name: KINDS[type(layer).__name__] for layer in model.layers if type(layer).__name__ in KINDS}
    pairs = [p for p in pairs if not (p[2] == "relu6" and not p[3])]   # ReLU6 fused into the layer: not rewritten
    relu_for = {r for p in pairs for r in p[3]} if relu6 == "replace" else set()
    copy = _clone(model, folds, relu_for)
    kernels = _kernels(model, folds)
    equalize_pairs(kernels, kinds, pairs, iterations, relu6_bounds(model, pairs, images) if relu6 == "clamp" else None)
    _copy_weights(model, copy, set(kernels) | set(folds))
    _set(copy, kernels)
    log.debug(f"equalize: {len(folds)} BatchNorm folded, {len(pairs)} layer pairs equalized"
             + (f", {len(relu_for)} ReLU6 made ReLU" if relu_for else ""))
    return copy, pairs


def per_tensor_int8(k: np.ndarray) -> np.ndarray:
    """The kernel quantized per tensor, symmetric int8 (scale max |w| / 127), dequantized."""
    scale = float(np.abs(k).max()) / 127.0
    return k if scale == 0 else np.clip(np.round(k / scale), -127, 127) * scale


def bias_shifts(model, images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """{layer: E[(W_q - W) x] per output channel} for every Conv2D / DepthwiseConv2D / Dense with a bias,
    W_q its kernel quantized per tensor, x its float input on `images` (mean over images and positions)."""
    from edgeft._keras import keras, tf

    layers = [layer for layer in model.layers if type(layer).__name__ in KINDS and getattr(layer, "use_bias", False)]
    if not layers:
        return {}
    feats = keras.Model(model.inputs, [layer.input for layer in layers])
    kernels = {layer.name: np.asarray(layer.get_weights()[0], np.float64) for layer in layers}
    noise = {n: tf.constant((per_tensor_int8(k) - k).astype(np.float32)) for n, k in kernels.items()}
    sums = {layer.name: np.zeros(_cout(KINDS[type(layer).__name__], kernels[layer.name])) for layer in layers}
    count = 0
    for i in range(0, len(images), batch):
        xs = feats(np.asarray(images[i:i + batch], np.float32), training=False)
        xs = xs if isinstance(xs, (list, tuple)) else [xs]
        for layer, x in zip(layers, xs):
            kind, dw = KINDS[type(layer).__name__], noise[layer.name]
            if kind == "conv":
                y = layer.convolution_op(x, dw)
            elif kind == "dw":
                y = keras.backend.depthwise_conv2d(x, dw, strides=layer.strides, padding=layer.padding,
                                                   dilation_rate=layer.dilation_rate, data_format=layer.data_format)
            else:
                y = tf.tensordot(x, dw, 1)
            sums[layer.name] += np.asarray(tf.reduce_mean(tf.reshape(y, [-1, y.shape[-1]]), 0), np.float64) * len(x)
        count += len(xs[0])
    return {n: s / max(count, 1) for n, s in sums.items()}


def correct_biases(model, images: np.ndarray) -> dict[str, float]:
    """Subtracts `bias_shifts` from each bias, in place; returns {layer: largest |shift| removed}."""
    shifts = bias_shifts(model, images)
    for layer in model.layers:
        if layer.name in shifts:
            k, b = layer.get_weights()
            layer.set_weights([k, (b.astype(np.float64) - shifts[layer.name]).astype(np.float32)])
    return {n: float(np.abs(s).max()) for n, s in shifts.items()}


def equalized_model(model, rep_images: np.ndarray, relu6: str = "clamp", bias_correction: bool = True):
    """The float model the per-tensor recovery candidate converts: BatchNorm folded, pairs equalized
    (ReLU6 by `relu6`, bounded on `rep_images` by default), biases corrected for per-tensor weight
    rounding on `rep_images`."""
    copy, _ = equalize(model, relu6, images=rep_images)
    if bias_correction:
        shifts = correct_biases(copy, rep_images)
        if shifts:
            worst = max(shifts, key=shifts.get)
            log.debug(f"equalize: bias correction of {len(shifts)} layers on {len(rep_images)} images "
                     f"(largest shift {shifts[worst]:.3g} in {worst})")
    return copy
