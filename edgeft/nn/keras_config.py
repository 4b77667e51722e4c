"""What a `.keras` file may name before Keras is let load it. No TensorFlow here.

tf_keras' safe_mode refuses Lambda layers, but not every call a hand-edited `config.json` can
make: an object's `module` is imported and its `class_name` looked up there, so a config naming
`{"module": "builtins", "class_name": "function", "config": "print"}` had Keras call
`builtins.print` with arguments of the file's choosing while loading. `check_keras_file` reads the
config first and refuses anything an edgeft model does not hold:

- an object from a module outside Keras' own layers, initializers, regularizers, constraints,
  optimizers, losses, metrics, activations, mixed precision and model classes, or edgeft's
  `Preprocess` layer;
- a function reference, except Keras' activations, losses and metrics;
- a Lambda layer, and a TFOpLambda / SlicingOpLambda layer (a TensorFlow function called by name:
  MobileNetV3 holds `__operators__.add` and `math.multiply`) whose function is not in `TF_OPS`.

Every backbone of the registry is built and checked by tests/test_model.py, and all but the three
slowest to load back (ResNet50, InceptionV3, MobileNetV3Large) are saved and loaded through it.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from edgeft.core.errors import UserError

KERAS_MODULES = frozenset({"layers", "initializers", "regularizers", "constraints", "optimizers", "losses",
                           "metrics", "activations", "mixed_precision", "engine", "models", "premade_models"})
FUNCTION_MODULES = frozenset({"activations", "losses", "metrics"})
EDGEFT_CLASSES = frozenset({("edgeft.layers", "Preprocess"), ("edgeft.layers", "SmoothedSparseCrossentropy")})
# TensorFlow functions TFOpLambda layers may call: what the registry's backbones hold, and plain
# arithmetic of the same kind
TF_OPS = frozenset({"__operators__.add", "__operators__.sub", "__operators__.mul", "__operators__.truediv",
                    "__operators__.getitem", "math.add", "math.subtract", "math.multiply", "math.truediv",
                    "nn.relu", "nn.relu6", "math.sigmoid"})
DATA_CLASSES = frozenset({"__tensor__", "__numpy__", "__bytes__", "__typespec__", "__ellipsis__", "__slice__"})
CONFIG_MEMBER = "config.json"


def _root(module: str) -> str | None:
    """`layers` for keras.layers, tf_keras.src.layers.core...; `models` for the top-level keras
    namespace (keras.Sequential); None outside Keras."""
    if module in ("keras", "tf_keras"):
        return "models"
    for prefix in ("tf_keras.src.", "keras.src.", "tf_keras.", "keras."):
        if module.startswith(prefix):
            return module[len(prefix):].split(".")[0]
    return None


def config_problem(config) -> str | None:
    """The first thing in a Keras config (the parsed config.json) that edgeft refuses, or None."""
    stack = [(config, "config")]
    while stack:
        obj, where = stack.pop()
        if isinstance(obj, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(obj)]
            continue
        if not isinstance(obj, dict):
            continue
        if "class_name" in obj:
            problem = _object_problem(obj)
            if problem:
                name = (obj.get("config") or {}).get("name") if isinstance(obj.get("config"), dict) else None
                return f"{problem}" + (f" (layer {name!r})" if isinstance(name, str) else f" (at {where})")
        stack += [(v, f"{where}.{k}") for k, v in obj.items()]
    return None


def _object_problem(obj: dict) -> str | None:
    cls, module = obj.get("class_name"), obj.get("module")
    if not isinstance(cls, str) or not (module is None or isinstance(module, str)):
        return "a malformed object"
    if module is None:
        return None if cls in DATA_CLASSES else f"{cls!r} with no module"
    if (module, cls) in EDGEFT_CLASSES:
        return None
    root = _root(module)
    if cls == "function" or obj.get("registered_name") == "function" or cls == "__lambda__":
        fn = obj.get("config")
        if root in FUNCTION_MODULES and isinstance(fn, str) and fn.isidentifier():
            return None
        return f"the function {module}.{fn} (only Keras' activations, losses and metrics are allowed)"
    if root not in KERAS_MODULES:
        return f"{module}.{cls} (not a Keras layer, model or training object, nor edgeft's)"
    if cls == "Lambda":
        return "a Lambda layer (arbitrary Python code)"
    if cls in ("TFOpLambda", "SlicingOpLambda"):
        fn = (obj.get("config") or {}).get("function") if isinstance(obj.get("config"), dict) else None
        if fn not in TF_OPS:
            return f"a {cls} layer calling tf.{fn} (allowed: {', '.join(sorted(TF_OPS))})"
    return None


def check_keras_file(path: str | Path) -> None:
    """Raises UserError (one line) when the `.keras` file's config names anything edgeft refuses
    (see the module docstring). A file that is no .keras archive is left to Keras to refuse."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read(CONFIG_MEMBER).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, UnicodeDecodeError):
        return
    problem = config_problem(config)
    if problem:
        raise UserError(f"refusing to load {path}: its config names {problem}, which no edgeft model holds "
                        f"(a hand-edited or foreign .keras file?)")
