"""edgeft: fine-tune VGG16 / MobileNet on an image folder and ship verified edge models.

Importing `edgeft` does not import TensorFlow (device-side code such as `edgeft.runtime` must
work without it); the training API is loaded on first use.
"""
__version__ = "0.1.0"

_LAZY = {"finetune": ("training", "finetune"), "EdgeftConfig": ("config", "EdgeftConfig"),
         "build_config": ("config", "build_config")}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'edgeft' has no attribute {name!r}")
