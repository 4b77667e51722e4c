"""Backbone registry: one row per supported `keras.applications` backbone.

Adding a backbone is adding one `register(...)` line. Each row says how to build it, its default
image size, the preprocessing its pretrained weights expect (applied by the `Preprocess` layer
inside the exported model), whether quantization-aware training works on it, and the image sizes
it takes.

Image sizes: the lower bound is the architecture's own (32 px for the MobileNets, ResNet50 and
VGG16, 75 px for InceptionV3: keras.applications refuses less). The upper bound, 1024 px for
every backbone, is edgeft's: 4.6x the 224 px the ImageNet weights were trained at (beyond that the
pretrained filters see ever smaller parts of an object, so a larger input buys no accuracy for the
cost), and what the rest of the pipeline can carry: a decoded cache row is 3 MiB at 1024 px
(75 MiB at 5000 px, which made LiteRT crash after a 1.5 GB cache entry), and stage 2's
activations grow with the square of the size (MobileNetV2's first block alone holds 512x512x32
floats, 32 MiB per image, at 1024 px). Edge devices run 96-512 px.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeft.core.errors import UserError


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
    max_size: int = 1024
    extra_kwargs: tuple[tuple[str, object], ...] = ()
    # The (alphas, sizes) Keras publishes backbone-only ImageNet weights for (include_top=False);
    # () = one set of weights that Keras loads at any size the architecture takes.
    imagenet: tuple[tuple[tuple[float, ...], tuple[int, ...]], ...] = ()


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    _REGISTRY[backbone.name] = backbone
    return backbone


_V3_NOTE = ("MobileNetV3's hard-swish activations are not supported by tensorflow-model-optimization "
            "QAT; edgeft uses post-training quantization (PTQ) for it")

register(Backbone("vgg16", "VGG16", 224, "caffe"))
# keras.applications' own tables (mobilenet.py, mobilenet_v2.py, mobilenet_v3.py): MobileNet at
# 128-224 px for every width; MobileNetV2 at 96-224 px, widths 1.3 / 1.4 at 224 only; MobileNetV3
# at 224 only (at another size Keras falls back to the 224 px weights with a warning: refused here)
register(Backbone("mobilenet", "MobileNet", 224, "tf", alphas=(0.25, 0.5, 0.75, 1.0),
                  imagenet=(((0.25, 0.5, 0.75, 1.0), (128, 160, 192, 224)),)))
register(Backbone("mobilenet_v2", "MobileNetV2", 224, "tf", alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
                  imagenet=(((0.35, 0.5, 0.75, 1.0), (96, 128, 160, 192, 224)), ((1.3, 1.4), (224,)))))
# include_preprocessing=False: the Preprocess layer does the same -1..1 scaling for every backbone.
register(Backbone("mobilenet_v3_small", "MobileNetV3Small", 224, "tf", qat=False, qat_note=_V3_NOTE,
                  alphas=(0.75, 1.0), extra_kwargs=(("include_preprocessing", False),),
                  imagenet=(((0.75, 1.0), (224,)),)))
register(Backbone("mobilenet_v3_large", "MobileNetV3Large", 224, "tf", qat=False, qat_note=_V3_NOTE,
                  alphas=(0.75, 1.0), extra_kwargs=(("include_preprocessing", False),),
                  imagenet=(((0.75, 1.0), (224,)),)))
register(Backbone("resnet50", "ResNet50", 224, "caffe"))
register(Backbone("inception_v3", "InceptionV3", 299, "tf", min_size=75))


def check_image_size(bb: Backbone, size: int) -> None:
    """Refuses an --image-size outside what the backbone takes (see the module docstring)."""
    if not bb.min_size <= size <= bb.max_size:
        raise UserError(f"{bb.name} takes --image-size from {bb.min_size} to {bb.max_size} px, got {size}")


def imagenet_sizes(bb: Backbone, alpha: float | None) -> tuple[int, ...] | None:
    """The sizes Keras has ImageNet weights for at this width; None: any size the architecture takes."""
    if not bb.imagenet:
        return None
    for alphas, sizes in bb.imagenet:
        if alpha in alphas:
            return sizes
    return ()


def names() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(names())}") from None
