"""Backbone registry: one row per supported `keras.applications` backbone.

Adding a backbone is adding one `register(...)` line. Each row says how to build it, its default
image size, the preprocessing its pretrained weights expect (applied by the `Preprocess` layer
inside the exported model) and whether quantization-aware training works on it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: str            # attribute of keras.applications
    default_size: int
    preprocess: str             # "tf" (-1..1), "caffe" (BGR, mean-subtracted) or "torch"
    qat: bool = True            # False: QAT breaks on it, PTQ only
    qat_note: str = ""
    alphas: tuple[float, ...] = ()   # width multipliers accepted; () = no --alpha
    min_size: int = 32
    extra_kwargs: tuple[tuple[str, object], ...] = ()


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    _REGISTRY[backbone.name] = backbone
    return backbone


_V3_NOTE = ("MobileNetV3's hard-swish activations are not supported by tensorflow-model-optimization "
            "QAT; edgeft uses post-training quantization (PTQ) for it")

register(Backbone("vgg16", "VGG16", 224, "caffe"))
register(Backbone("mobilenet", "MobileNet", 224, "tf", alphas=(0.25, 0.5, 0.75, 1.0)))
register(Backbone("mobilenet_v2", "MobileNetV2", 224, "tf", alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4)))
# include_preprocessing=False: the Preprocess layer does the same -1..1 scaling for every backbone.
register(Backbone("mobilenet_v3_small", "MobileNetV3Small", 224, "tf", qat=False, qat_note=_V3_NOTE,
                  alphas=(0.75, 1.0), extra_kwargs=(("include_preprocessing", False),)))
register(Backbone("mobilenet_v3_large", "MobileNetV3Large", 224, "tf", qat=False, qat_note=_V3_NOTE,
                  alphas=(0.75, 1.0), extra_kwargs=(("include_preprocessing", False),)))
register(Backbone("resnet50", "ResNet50", 224, "caffe"))
register(Backbone("inception_v3", "InceptionV3", 299, "tf", min_size=75))


def names() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(names())}") from None
