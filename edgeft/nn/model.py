"""One flat Keras model: input (raw RGB 0-255) -> Preprocess -> backbone -> head.

Flat means every backbone layer is a layer of the model itself, never a model nested inside it:
tensorflow-model-optimization's QAT refuses nested models. Layers are told apart by name:
`preprocess`, `head_*` and `predictions`; everything else is backbone.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

from edgeft._keras import keras
from edgeft.core import byob as byob_spec
from edgeft.core.config import ModelConfig
from edgeft.core.errors import UserError
from edgeft.core.registry import Backbone, check_image_size, check_weights, get_backbone
from edgeft.device import clip
from edgeft.layers import Preprocess, SmoothedSparseCrossentropy
from edgeft.nn import byob, efficientnet_lite
from edgeft.nn.keras_config import check_keras_file

INPUT = "image"
PREPROCESS = "preprocess"
HEAD_PREFIX = "head_"
OUTPUT = "predictions"
MODEL_PREFIX = "edgeft_"   # the model's name: edgeft_<backbone> (edgeft_file_<name>: a backbone file)
FILE_MODEL_PREFIX = MODEL_PREFIX + "file_"

# builders of the registry's rows outside keras.applications (Backbone.builder names one):
# builder(row, input tensor, weights) -> the backbone as a keras.Model ending at its features
BUILDERS = {"efficientnet_lite": efficientnet_lite.build}


def resolve_image_size(model_cfg: ModelConfig, image_size: int | None) -> int:
    if byob_spec.is_file_backbone(model_cfg.backbone):   # loads and checks the file (every refusal, one line)
        return byob.inspect(model_cfg, image_size)
    bb = get_backbone(model_cfg.backbone)
    size = image_size or bb.default_size
    check_image_size(bb, size)
    return size


def _alpha_kwargs(bb: Backbone, alpha: float | None) -> dict:
    if not bb.alphas:
        if alpha not in (None, 1.0):
            raise UserError(f"--alpha applies to MobileNets only, not {bb.name}")
        return {}
    alpha = 1.0 if alpha is None else alpha
    if alpha not in bb.alphas:
        raise UserError(f"--alpha for {bb.name} must be one of {', '.join(map(str, bb.alphas))}, got {alpha}")
    return {"alpha": alpha}


def _is_download_failure(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(s in text for s in ("url fetch failure", "urlopen", "name resolution", "http error",
                                   "connection", "temporary failure", "network is unreachable"))


def build_backbone(model_cfg: ModelConfig, x, image_size: int) -> keras.Model:
    """The backbone on tensor `x` (so its layers join the flat model): a keras.applications base,
    or the row's own builder, or a backbone file rebuilt flat (nn/byob.py)."""
    if byob_spec.is_file_backbone(model_cfg.backbone):
        return byob.build(model_cfg, x, image_size, is_reserved)
    bb = get_backbone(model_cfg.backbone)
    kwargs = dict(bb.extra_kwargs) | _alpha_kwargs(bb, model_cfg.alpha)
    weights = model_cfg.weights
    check_weights(bb, weights)
    if bb.builder:
        return BUILDERS[bb.builder](bb, x, weights)
    ctor = getattr(keras.applications, bb.constructor)
    load_path = None
    if weights not in ("imagenet", "none"):
        load_path = Path(weights)
        if not load_path.is_file():
            raise UserError(f"--weights file not found: {load_path}")
    try:
        base = ctor(input_tensor=x, include_top=False,
                    weights="imagenet" if weights == "imagenet" else None, **kwargs)
    except ValueError as e:
        raise UserError(f"{bb.name}: {str(e).splitlines()[0]}") from None
    except Exception as e:
        if weights == "imagenet" and _is_download_failure(e):
            raise UserError(f"cannot download ImageNet weights for {bb.name} (no internet?); "
                            f"pass --weights PATH with a backbone-only weights file, or --weights none") from None
        raise
    if load_path is not None:
        try:
            base.load_weights(str(load_path))
        except Exception as e:
            raise UserError(f"--weights {load_path} does not fit {bb.name} "
                            f"(alpha {kwargs.get('alpha', '-')}, include_top=False): "
                            f"{clip((str(e).splitlines() or [''])[0])}") from None
    return base


def build_head(model_cfg: ModelConfig, num_classes: int) -> list[keras.layers.Layer]:
    """The new classifier head, in order: the default recipe is GAP / dropout 0.2 / softmax with
    L2 1e-4, the seed's flatten / Dense 256 relu / dropout 0.5 / softmax."""
    pool = (keras.layers.Flatten(name=HEAD_PREFIX + "flatten") if model_cfg.head == "flatten"
            else keras.layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "gap"))   # auto: GAP until stage 1 chooses
    l2 = getattr(model_cfg, "l2", 0.0)
    reg = (lambda: keras.regularizers.L2(l2)) if l2 else (lambda: None)
    layers = [pool]
    if model_cfg.dense:
        layers.append(keras.layers.Dense(model_cfg.dense, activation="relu", kernel_regularizer=reg(),
                                         name=HEAD_PREFIX + "dense"))
    if model_cfg.dropout:
        layers.append(keras.layers.Dropout(model_cfg.dropout, name=HEAD_PREFIX + "dropout"))
    # float32 softmax keeps probabilities exact under mixed precision
    layers.append(keras.layers.Dense(num_classes, activation="softmax", dtype="float32", kernel_regularizer=reg(),
                                     name=OUTPUT))
    return layers


def with_head(model: keras.Model, model_cfg: ModelConfig, num_classes: int) -> keras.Model:
    """The same model (its input, preprocessing and backbone layers shared) with a new head built by
    `model_cfg`: stage 1's cross-validation may choose the head (`--head auto`) after the model is built."""
    features = head_layers(model)[0].input
    return keras.Model(model.input, apply_layers(build_head(model_cfg, num_classes), features), name=model.name)


def apply_layers(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def build_model(model_cfg: ModelConfig, image_size: int, num_classes: int) -> keras.Model:
    """The flat fine-tuning model taking float32 RGB pixels 0-255, NHWC."""
    if byob_spec.is_file_backbone(model_cfg.backbone):
        pre, name = byob_spec.parse_preprocess(model_cfg.preprocess), byob_spec.label(model_cfg.backbone,
                                                                                     model_cfg.backbone_file)
    else:
        bb = get_backbone(model_cfg.backbone)
        pre, name = bb.preprocessing, bb.name
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name=INPUT)
    x = Preprocess(**pre.layer_kwargs(), name=PREPROCESS)(inputs)
    base = build_backbone(model_cfg, x, image_size)
    outputs = apply_layers(build_head(model_cfg, num_classes), base.output)
    return keras.Model(inputs, outputs, name=f"{MODEL_PREFIX}{name}")


def is_reserved(name: str) -> bool:
    """A layer name edgeft keeps for its own layers (a backbone file's layer so named is renamed)."""
    return name in (INPUT, PREPROCESS, OUTPUT) or name.startswith(HEAD_PREFIX)


def is_file_model(model: keras.Model) -> bool:
    """The model was built on a backbone file (its blocks are told by its graph, nn/byob.py)."""
    return model.name.startswith(FILE_MODEL_PREFIX)


def model_blocks(model: keras.Model) -> tuple[list[list[str]], str]:
    """The backbone's layer names in blocks, bottom to top, and the rule that told them."""
    layers = backbone_layers(model)
    if is_file_model(model):
        return byob.graph_blocks(layers)
    bb = model_backbone(model)
    return backbone_blocks([layer.name for layer in layers], bb), "the registry row's block pattern"


def model_backbone(model: keras.Model) -> Backbone:
    """The registry row an edgeft model was built from (its name says)."""
    if not model.name.startswith(MODEL_PREFIX):
        raise UserError(f"{model.name} is not an edgeft model (named {MODEL_PREFIX}<backbone>)")
    return get_backbone(model.name[len(MODEL_PREFIX):])


def is_backbone(layer) -> bool:
    return not (isinstance(layer, keras.layers.InputLayer) or layer.name == PREPROCESS
                or layer.name.startswith(HEAD_PREFIX) or layer.name == OUTPUT)


def backbone_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if is_backbone(layer)]


def head_layers(model: keras.Model) -> list:
    return [layer for layer in model.layers if layer.name.startswith(HEAD_PREFIX) or layer.name == OUTPUT]


def head_kind(model: keras.Model) -> str:
    """The pooling of the model's head: "flatten" or "gap" (build_head names its first layer so)."""
    return head_layers(model)[0].name[len(HEAD_PREFIX):]


def feature_extractor(model: keras.Model) -> keras.Model:
    """Input pixels -> backbone output (what the head sees); shares the model's layers."""
    return keras.Model(model.input, head_layers(model)[0].input, name="features")


def head_model(model: keras.Model) -> keras.Model:
    """Backbone features -> probabilities, sharing the model's head layers (training it trains them)."""
    first = head_layers(model)[0]
    inputs = keras.Input(first.input.shape[1:], name="features")
    return keras.Model(inputs, apply_layers(head_layers(model), inputs), name="head")


def is_batchnorm(layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization)


def backbone_blocks(names: list[str], bb: Backbone) -> list[list[str]]:
    """The backbone's layer names in blocks, bottom to top, told by the row's block patterns.
    Layers outside any named block join the block before them (MobileNetV2's Conv_1 / out_relu
    join block_16); the stem before the first block is a block of its own. A row with
    `block_end` instead ends a block at each layer it matches (InceptionV3's mixedN)."""
    patterns = [re.compile(p) for p in bb.blocks]

    def block_id(name):
        for pat in patterns:
            m = pat.match(name)
            if m:
                return m.group(1)
        return None

    blocks: list[list[str]] = []
    if any(block_id(n) for n in names):
        current = object()
        for n in names:
            b = block_id(n)
            if b is not None and b != current:
                blocks.append([])
                current = b
            elif not blocks:
                blocks.append([])
            blocks[-1].append(n)
        return blocks
    end = re.compile(bb.block_end) if bb.block_end else None
    blocks = [[]]
    for n in names:   # blocks that end at a marker layer (InceptionV3's mixedN)
        blocks[-1].append(n)
        if end is not None and end.match(n):
            blocks.append([])
    if not blocks[-1]:
        blocks.pop()
    elif len(blocks) > 1:   # what follows the last marker joins the last block
        blocks[-2].extend(blocks.pop())
    return blocks


def _top_blocks(names: list[str], spec: str, blocks: list[list[str]]) -> list[str]:
    arg = spec.split(":", 1)[1].strip()
    try:
        value = float(arg)
    except ValueError:
        raise UserError(f"--unfreeze {spec!r}: blocks:N (a number of top blocks) or blocks:F (a fraction of the "
                        f"backbone's layers, rounded up to whole blocks)") from None
    if "." in arg or "e" in arg.lower():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"--unfreeze blocks fraction must be between 0 and 1, got {arg}")
        want, chosen = math.ceil(value * len(names)), []
        for block in reversed(blocks):
            if len(chosen) >= want:
                break
            chosen = block + chosen
        return chosen
    n = int(value)
    if n < 0 or value != n:
        raise UserError(f"--unfreeze blocks count must be a whole number, 0 or more, got {arg}")
    return [name for block in blocks[len(blocks) - min(n, len(blocks)):] for name in block]


def select_unfreeze(model: keras.Model, spec: str) -> list[str]:
    """Backbone layers stage 2 may train, from the top: whole top blocks (blocks:N, blocks:F), a
    count, a fraction or a layer name.

    A name selects that layer and every backbone layer after it; a block prefix such as `block5`
    or `block_13` selects from the first layer whose name starts with it.
    """
    layers = backbone_layers(model)
    names = [layer.name for layer in layers]
    spec = str(spec).strip()
    if spec.lower().startswith("blocks:"):
        return _top_blocks(names, spec, model_blocks(model)[0])
    try:
        value = float(spec)
    except ValueError:
        value = None
    if value is not None:
        if "." in spec or "e" in spec.lower():
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--unfreeze fraction must be between 0 and 1, got {spec}")
            n = math.ceil(value * len(names))
        else:
            n = int(value)
            if n < 0:
                raise UserError(f"--unfreeze count must be 0 or more, got {spec}")
        return names[len(names) - min(n, len(names)):]
    if spec in names:
        return names[names.index(spec):]
    starts = [i for i, name in enumerate(names) if name.startswith(spec + "_")]
    if starts:
        return names[starts[0]:]
    sample = ", ".join(names[-6:])
    raise UserError(f"--unfreeze {spec!r} is not a layer or block of {model.name} "
                    f"(top layers: {sample})")


def freeze_backbone(model: keras.Model) -> None:
    """Stage 1: only the head trains."""
    for layer in model.layers:
        layer.trainable = not is_backbone(layer) and layer.name != PREPROCESS


def unfreeze_top(model: keras.Model, spec: str) -> list[str]:
    """Stage 2: head + chosen backbone layers train; BatchNorm stays frozen, which in Keras 2
    also runs it in inference mode (moving statistics used and kept)."""
    chosen = set(select_unfreeze(model, spec))
    for layer in model.layers:
        if is_backbone(layer):
            layer.trainable = layer.name in chosen and not is_batchnorm(layer)
        else:
            layer.trainable = layer.name != PREPROCESS
    return [layer.name for layer in model.layers if layer.trainable and layer.weights and is_backbone(layer)]


@contextlib.contextmanager
def float32_policy():
    """Runs a block under the float32 Keras policy, restoring the process's policy after."""
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def as_float32(model: keras.Model) -> keras.Model:
    """The model with every layer computing in float32 (same weights); the model itself when it
    already does. A model trained with --mixed-precision keeps its float16 layers when saved and
    loaded, and neither the edge converters (TFLite has no float16 Conv2D) nor tfmot's QAT take
    them: what is saved as model.keras is this float32 copy. Mixed precision keeps its variables
    in float32, so the copy carries the trained weights exactly."""
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model

    def clone(layer):
        config = layer.get_config()
        if "dtype" in config:
            config = {**config, "dtype": "float32"}
        return layer.__class__.from_config(config)

    with float32_policy(), keras.utils.custom_object_scope(custom_objects()):
        copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def copy_model(model: keras.Model, weights: list | None = None) -> keras.Model:
    """The same model with variables of its own, created where this is called (outside a
    distribution strategy's scope: variables of this process alone), and the same weights
    (`weights`: model.get_weights() already read)."""
    with keras.utils.custom_object_scope(custom_objects()):
        copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights() if weights is None else weights)
    return copy


def custom_objects() -> dict:
    return {"edgeft>Preprocess": Preprocess, "Preprocess": Preprocess,
            "edgeft>SmoothedSparseCrossentropy": SmoothedSparseCrossentropy}


def load_model(path: str | Path, compile: bool = False) -> keras.Model:
    """A saved edgeft `.keras` model, loaded with safe_mode on (no arbitrary code)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}")
    check_keras_file(p)   # before Keras imports or calls anything the config names
    try:
        return keras.models.load_model(p, custom_objects=custom_objects(), compile=compile, safe_mode=True)
    except Exception as e:  # corrupt, truncated or foreign file: one line, not a Keras traceback
        raise UserError(f"cannot load {p}: {clip((str(e).strip().splitlines() or [type(e).__name__])[0])}") from None


def num_classes(model: keras.Model) -> int:
    return int(model.output_shape[-1])


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy and TensorFlow for repeatable runs."""
    keras.utils.set_random_seed(seed)
