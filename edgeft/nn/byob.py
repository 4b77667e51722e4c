"""Bring your own backbone: a `.keras` / `.h5` image model loaded, checked and rebuilt into the
one flat edgeft model (TF-free part: edgeft/core/byob.py).

- refused with one line: Lambda layers and custom layer classes (the `.keras` allow-list of
  nn/keras_config.py, and the same rules read from an .h5 file's config), a subclassed model, a
  model with more than one input or not taking (batch, height, width, 3) images, a fixed input
  size other than --image-size, an unknown --backbone-output layer, features that are neither a
  feature map nor a vector;
- nested functional / Sequential models are flattened: every layer is rebuilt (from its config,
  its weights copied) on edgeft's own input, so the model stays one flat Keras model, which
  tfmot's QAT needs; a layer whose name edgeft keeps for itself (`preprocess`, `head_*`,
  `predictions`, `image`) or that repeats another's is renamed `bb_<name>`;
- a feature vector gets a Reshape to a 1x1 map (`features_map`), so the head's pooling works as on
  every registered backbone;
- blocks (what --unfreeze blocks:N / blocks:F count) split at merge points (Add / Concatenate /
  Average close a block), else at stride-2 convolutions (which open one) and pooling layers (which
  close one); the layers after the last split are the top block (joining the one below when they
  hold no weights); report.md says which rule applied.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from edgeft._keras import keras, tf
from edgeft.core import byob as spec
from edgeft.core.errors import UserError
from edgeft.device import clip
from edgeft.nn.keras_config import CONFIG_MEMBER, TF_OPS, check_keras_file

GRAPH_MODELS = frozenset({"Functional", "Sequential", "Model"})
FEATURES_MAP = "features_map"
MERGE_CLASSES = ("Add", "Concatenate", "Average")
RULE_MERGE = "merge points (each Add / Concatenate / Average closes a block)"
RULE_STRIDE = "stride-2 convolutions (each opens a block) and pooling layers (each closes one)"
RULE_NONE = "one block (no merge point, stride-2 convolution or pooling layer)"


# ------------------------------------------------------------------ the file's config
def _layer_problem(layer: dict) -> str | None:
    cls = layer.get("class_name")
    cfg = layer.get("config") if isinstance(layer.get("config"), dict) else {}
    name = cfg.get("name")
    if cls in GRAPH_MODELS:
        return layers_problem(layer)
    if cls == "Lambda":
        return f"a Lambda layer {name!r} (arbitrary Python code)"
    if cls in ("TFOpLambda", "SlicingOpLambda"):
        fn = cfg.get("function")
        return None if fn in TF_OPS else f"a {cls} layer {name!r} calling tf.{fn}"
    if cls == "InputLayer":
        return None
    module = str(layer.get("module") or "keras")
    registered = layer.get("registered_name")
    builtin = getattr(keras.layers, str(cls), None)
    if (not (isinstance(builtin, type) and issubclass(builtin, keras.layers.Layer))
            or module.split(".")[0] not in ("keras", "tf_keras") or registered not in (None, cls)):
        return f"the custom layer class {registered or cls} (layer {name!r})"
    return None


def layers_problem(config: dict) -> str | None:
    """The first layer of a model config (a .keras file's config.json, an .h5 file's
    model_config, nested models included) that a backbone file may not hold, or None."""
    if not isinstance(config, dict):
        return "no model config"
    if config.get("class_name") not in GRAPH_MODELS:
        return f"a {config.get('class_name')} model (subclassed: save it as a functional or Sequential model)"
    for layer in (config.get("config") or {}).get("layers") or []:
        problem = _layer_problem(layer) if isinstance(layer, dict) else "a malformed layer"
        if problem:
            return problem
    return None


def _read_config(path: Path) -> dict:
    if path.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(path) as zf:
                return json.loads(zf.read(CONFIG_MEMBER).decode("utf-8"))
        except (zipfile.BadZipFile, KeyError, OSError, ValueError, UnicodeDecodeError):
            raise UserError(f"--backbone {path}: not a Keras .keras model file") from None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get("model_config")
    except OSError:
        raise UserError(f"--backbone {path}: not an HDF5 (.h5) file") from None
    if text is None:
        raise UserError(f"--backbone {path} holds weights only, no model: save the whole model "
                        f"(model.save('backbone.h5') or .keras)")
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)


def load_file(path: str | Path) -> keras.Model:
    """The backbone file as Keras loads it, after its config passed the checks (module docstring)."""
    path = Path(path)
    problem = layers_problem(_read_config(path))
    if problem:
        raise UserError(f"--backbone {path}: refused: it holds {problem}; edgeft takes Keras' own layers only")
    if path.suffix.lower() == ".keras":
        check_keras_file(path)   # functions and modules the config names, as for every .keras edgeft loads
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise UserError(f"--backbone {path}: cannot load it: "
                        f"{clip((str(e).strip().splitlines() or [type(e).__name__])[0])}") from None
    _check_graph(model, path)
    return model


def _check_graph(model, path) -> None:
    if not isinstance(model, keras.Model) or not getattr(model, "_is_graph_network", False):
        raise UserError(f"--backbone {path}: a subclassed model cannot be flattened into edgeft's model; save it as a "
                        f"functional or Sequential model")
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _check_graph(layer, f"{path} (nested model {layer.name!r})")
    if len(model.inputs) != 1:
        raise UserError(f"--backbone {path}: takes {len(model.inputs)} inputs; a backbone takes one image")


# ------------------------------------------------------------------ what it takes and gives
def input_size(model: keras.Model, path, image_size: int | None) -> int:
    """--image-size checked against the file's input: (batch, h, w, 3); a fixed h x w must be square
    and equal --image-size (default: the fixed size)."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"--backbone {path}: takes input {shape[1:]}; a backbone takes RGB images (height, width, 3)")
    h, w = shape[1], shape[2]
    if h is None and w is None:
        if image_size is None:
            raise UserError(f"--backbone {path} takes any input size: give --image-size")
        return image_size
    if h != w:
        raise UserError(f"--backbone {path}: fixed input size {h}x{w}; edgeft trains square images")
    if image_size is not None and image_size != h:
        raise UserError(f"--backbone {path}: fixed input size {h}x{w} differs from --image-size {image_size}")
    return int(h)


def inspect(model_cfg, image_size: int | None) -> int:
    """Every refusal of a backbone file before training (loads it once): returns the image size."""
    path, _ = spec.source_file(model_cfg)
    model = load_file(path)
    size = input_size(model, path, image_size)
    features = _output_tensor(model, model_cfg.backbone_output, path)
    _feature_rank(features, path)
    return size


def _output_tensor(model: keras.Model, layer_name: str | None, path):
    if not layer_name:
        if len(model.outputs) != 1:
            raise UserError(f"--backbone {path}: has {len(model.outputs)} outputs; name the feature layer with "
                            f"--backbone-output")
        return model.outputs[0]
    found = _find_layer(model, layer_name)
    if found is None:
        names = [layer.name for layer in _flat_layers(model)]
        raise UserError(f"--backbone-output {layer_name!r} is not a layer of {path} (its last layers: "
                        f"{', '.join(names[-6:])})")
    return found.output


def _flat_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def _find_layer(model, name):
    return next((layer for layer in _flat_layers(model) if layer.name == name), None)


def _feature_rank(t, path) -> int:
    rank = len(t.shape)
    if rank not in (2, 4):
        raise UserError(f"--backbone {path}: its features have shape {tuple(t.shape)[1:]}; a backbone gives a "
                        f"feature map (h, w, c) or a vector (c)")
    return rank


# ------------------------------------------------------------------ rebuilding it flat
class _Rebuilder:
    """Calls a fresh copy of every layer of a functional graph on new tensors (nested graph models
    inlined), as tf_keras' Functional._run_internal_graph runs a graph."""

    def __init__(self, reserved, copy_weights: bool):
        self.reserved, self.copy_weights = reserved, copy_weights
        self.names: set[str] = set()
        self.copies: dict[int, object] = {}   # id(original layer) -> its copy (shared layers stay shared)
        self.renamed: dict[str, str] = {}     # original name -> name in the flat model

    def copy(self, layer):
        if id(layer) in self.copies:
            return self.copies[id(layer)]
        config = dict(layer.get_config())
        config.pop("dtype", None)   # the process's policy, as for every registered backbone
        name = layer.name
        if self.reserved(name) or name in self.names:
            base, n = f"bb_{name}", 1
            name = base
            while name in self.names or self.reserved(name):
                n += 1
                name = f"{base}_{n}"
        config["name"] = name
        self.names.add(name)
        self.renamed.setdefault(layer.name, name)
        new = layer.__class__.from_config(config)
        self.copies[id(layer)] = new
        return new

    def run(self, model, inputs: list):
        usage = model._tensor_usage_count   # noqa: SLF001 - the graph's own bookkeeping, as Keras runs it
        tensors = {}
        for x, y in zip(model.inputs, inputs):
            tensors[str(id(x))] = [y] * usage[str(id(x))]
        pending = []
        for depth in sorted(model._nodes_by_depth, reverse=True):   # noqa: SLF001
            for node in model._nodes_by_depth[depth]:   # noqa: SLF001
                if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                    continue
                args, kwargs = node.map_arguments(tensors)
                layer = node.layer
                if isinstance(layer, keras.Model):   # a nested graph: its layers join this one
                    outs = self.run(layer, tf.nest.flatten(args))
                    outputs = tf.nest.pack_sequence_as(layer._nested_outputs, outs)   # noqa: SLF001
                else:
                    new = self.copy(layer)
                    outputs = new(*args, **kwargs)
                    pending.append((layer, new))
                for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    tensors[x_id] = [y] * usage[x_id]
        if self.copy_weights:
            for old, new in pending:
                if old.weights:
                    new.set_weights(old.get_weights())
        return [tensors[str(id(x))].pop() for x in model.outputs]


def build(model_cfg, x, image_size: int, reserved) -> keras.Model:
    """The file's backbone rebuilt flat on tensor `x` (the Preprocess output), ending at its
    features (a 4-D map; a vector is reshaped to 1x1); `reserved(name)`: names edgeft keeps."""
    path, _ = spec.source_file(model_cfg)
    user = load_file(path)
    input_size(user, path, image_size)
    # 1. flat, on an input of its own (nested models inlined, names made unique), weights copied
    first = _Rebuilder(reserved, copy_weights=True)
    inp = keras.Input(tuple(user.input_shape[1:]))
    flat = keras.Model(inp, first.run(user, [inp]))
    # 2. cut at the feature layer
    if model_cfg.backbone_output:
        _output_tensor(user, model_cfg.backbone_output, path)   # one line when unknown
        features = flat.get_layer(first.renamed[model_cfg.backbone_output]).output
    else:
        features = _output_tensor(flat, None, path)
    cut = keras.Model(flat.input, features)
    # 3. onto edgeft's input: fresh layers again (names already unique), weights unless --weights none
    second = _Rebuilder(reserved, copy_weights=model_cfg.weights != "none")
    h = second.run(cut, [x])[0]
    if _feature_rank(h, path) == 2:
        h = keras.layers.Reshape((1, 1, int(h.shape[-1])), name=FEATURES_MAP)(h)
    return keras.Model(keras.utils.get_source_inputs(x), h, name=spec.label(model_cfg.backbone, model_cfg.backbone_file))


# ------------------------------------------------------------------ blocks
def _is_stride2(layer) -> bool:
    strides = getattr(layer, "strides", None)
    return (hasattr(layer, "kernel_size") and strides is not None
            and max(tf.nest.flatten(strides)) >= 2 and "Pooling" not in type(layer).__name__)


def _is_pooling(layer) -> bool:
    return "Pooling" in type(layer).__name__


def graph_blocks(layers: list) -> tuple[list[list[str]], str]:
    """The backbone layers (in model order) in blocks, bottom to top, and the rule that split them."""
    names = [layer.name for layer in layers]
    if any(type(layer).__name__ in MERGE_CLASSES for layer in layers):
        closes, opens, rule = [type(layer).__name__ in MERGE_CLASSES for layer in layers], [False] * len(layers), RULE_MERGE
    elif any(_is_stride2(layer) or _is_pooling(layer) for layer in layers):
        closes, opens, rule = [_is_pooling(layer) for layer in layers], [_is_stride2(layer) for layer in layers], RULE_STRIDE
    else:
        return ([names] if names else []), RULE_NONE
    blocks: list[list[str]] = [[]]
    for name, close, open_ in zip(names, closes, opens):
        if open_ and blocks[-1]:
            blocks.append([])
        blocks[-1].append(name)
        if close:
            blocks.append([])
    if not blocks[-1]:
        blocks.pop()
    weighted = {layer.name for layer in layers if layer.weights}
    if len(blocks) > 1 and not weighted & set(blocks[-1]):   # nothing to train on its own: joins the block below
        blocks[-2].extend(blocks.pop())
    return blocks, rule   # what follows the last merge or pooling layer is the top block
