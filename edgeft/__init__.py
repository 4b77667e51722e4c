"""edgeft: fine-tune VGG16 / MobileNet on an image folder and ship verified edge models.

Importing `edgeft` does not import TensorFlow (device-side code such as `edgeft.nn.runtime` must
work without it); the training API is loaded on first use:

    import edgeft
    model = edgeft.load_model("runs/flowers/model.keras")   # a trained model, with edgeft's layer
    run = edgeft.Run.open("runs/flowers")                   # a run: config, splits, model, files

A plain `tf_keras.models.load_model(path)` works once `edgeft.layers` is imported (it registers
edgeft's one custom layer, `Preprocess`); `import edgeft` does that itself when tf_keras is
already imported.

edgeft logs to the `edgeft` logger (the library adds only a NullHandler; `edgeft` on the command
line shows it): `logging.basicConfig(level=logging.INFO)` shows a library call's progress lines.
"""
import logging
import sys

__version__ = "0.1.0"
__all__ = ["__version__", "finetune", "EdgeftConfig", "build_config", "load_model", "Run"]

_LAZY = {"finetune": ("pipeline.orchestrator", "finetune"), "EdgeftConfig": ("core.config", "EdgeftConfig"),
         "build_config": ("core.config", "build_config"), "load_model": ("nn.model", "load_model"),
         "Run": ("run", "Run")}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'edgeft' has no attribute {name!r}")


logging.getLogger("edgeft").addHandler(logging.NullHandler())

if "tf_keras" in sys.modules:   # Keras is loaded already: register the custom layer for plain loads
    from edgeft import layers  # noqa: E402,F401
