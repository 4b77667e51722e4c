"""Each export format's builder, registered under its row's name (edgeft.core.formats.FORMATS).

`@builds("tflite_fp16")` maps the row's name to the function that makes its bytes; export looks the
builder up by the row's name (`BUILDERS[fmt.name]`), never by position or by a function's name, so
adding a format is a row in the table, a builder here, and a tier row only when no existing tier
judges it (docs/export.md, "Adding a format").

A builder takes the export's context and its row and returns the file's bytes. The context
(edgeft.pipeline.exporter.ExportContext) carries the models, the calibration images, the labels,
what each file was made from (`made_from`, written to formats.json) and the floors already measured
(`floors`); `ctx.int8_tflite(fmt)` is the int8 choice between PTQ and QAT, made above this layer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeft.core.formats import TFLM_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builder:
    make: Callable                       # (ctx, fmt) -> bytes
    uses_int8_choice: bool = False       # builds from the int8 choice (QAT model loaded when the run has one)
    after_write: Callable | None = None  # (ctx, fmt, path) -> None, once the file is written in the staging dir


BUILDERS: dict[str, Builder] = {}


def builds(*names: str, uses_int8_choice: bool = False, after_write: Callable | None = None):
    """Registers the decorated function as the builder of the formats named."""
    def register(fn):
        for name in names:
            if name in BUILDERS:
                raise ValueError(f"two builders for the format {name!r}")
            BUILDERS[name] = Builder(fn, uses_int8_choice, after_write)
        return fn
    return register


class BareContext:
    """What a builder needs to make a file outside a run (`edgeft search`'s untrained candidates):
    the int8 file by plain post-training quantization; with `metadata`, export's metadata too (the
    search judges the size of the file as it ships, docs/search.md)."""

    def __init__(self, model, cfg, rep_images, labels: list[str], metadata: bool = False):
        from dataclasses import replace

        size = int(model.input_shape[1])
        self.model, self.rep_images, self.labels, self.metadata = model, rep_images, labels, metadata
        self.cfg = replace(cfg, data=replace(cfg.data, image_size=size))
        self.run, self.cache, self.made_from, self.floors = None, {}, {}, {}

    def int8_tflite(self, fmt) -> bytes:
        if "tflite_int8" not in self.cache:
            from edgeft.export.keras2tflite import tflite_int8 as convert

            ex = self.cfg.export
            data = convert(self.model, self.rep_images, ex.int8_io, ex.int8_granularity)
            self.cache["tflite_int8"] = with_metadata(data, self)
        return self.cache["tflite_int8"]


# ---------------------------------------------------------------- TFLite
def with_metadata(data: bytes, ctx, kept_float: list[str] | None = None) -> bytes:
    """Standard TFLite Model Metadata: name, version, RGB 0-255 input, labels (MediaPipe, Android);
    `kept_float`: the layers a mixed file (int8 recovery) keeps in float, named in its description."""
    if not getattr(ctx, "metadata", True):
        return data
    from edgeft import __version__
    from edgeft.export.tflite_metadata import with_metadata as add

    size = ctx.cfg.data.image_size
    return add(data, ctx.labels, name=f"edgeft {ctx.cfg.model.backbone}",
               version=f"edgeft {__version__}",   # not the run's name: same bytes wherever the run lives
               description=f"{ctx.cfg.model.backbone} image classifier, {len(ctx.labels)} classes, "
                           f"{size}x{size} RGB 0-255 input (preprocessing in the graph)"
                           + (f"; int8 with these layers kept float: {', '.join(kept_float)}" if kept_float else ""))


@builds("tflite_float")
def tflite_float(ctx, fmt) -> bytes:
    from edgeft.export import keras2tflite

    return with_metadata(keras2tflite.tflite_float(ctx.model), ctx)


@builds("tflite_fp16")
def tflite_fp16(ctx, fmt) -> bytes:
    from edgeft.export import keras2tflite

    return with_metadata(keras2tflite.tflite_fp16(ctx.model), ctx)


@builds("tflite_dynamic")
def tflite_dynamic(ctx, fmt) -> bytes:
    from edgeft.export import keras2tflite

    return with_metadata(keras2tflite.tflite_dynamic(ctx.model), ctx)


def _tflm_sources(ctx, fmt, path: Path) -> None:
    """export/tflm/: the C sources of the int8 file, the arena measured by TensorFlow Lite Micro."""
    from edgeft.core.progress import step
    from edgeft.export.tflm import write_tflm

    with step("export", f"TFLite Micro sources in {TFLM_DIR}/ (measuring the arena)", key="tflm sources"):
        info = write_tflm(path, path.parent / TFLM_DIR, ctx.labels)
    log.info(f"export: built {TFLM_DIR}/ (flash {info['flash_bytes']} bytes, "
             f"tensor arena {info['arena_bytes']} bytes measured by TFLite Micro)")


@builds("tflite_int8", uses_int8_choice=True)
def tflite_int8(ctx, fmt) -> bytes:
    """Full integer, uint8 (or int8) in and out: the better of PTQ and QAT (see edgeft.quantize.int8_choice)."""
    return ctx.int8_tflite(fmt)


INT16X8_OPS = ("EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8",)   # tf.lite.OpsSet member
BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")   # float32 input -> int16, int16 -> float32 output


@builds("tflite_int16x8")
def tflite_int16x8(ctx, fmt) -> bytes:
    """int16 activations, int8 weights (int64 biases): LiteRT's 16x8 mode, post-training, on the int8
    file's calibration images, at the run's --int8-granularity. Float32 input and output: raw pixels
    0-255 in, probabilities out, as the float file (MediaPipe's ImageClassifier refuses an int16 input:
    "Requested one of these types: uint8/float32, got INT16"). Checked after conversion: no op but the
    boundary QUANTIZE / DEQUANTIZE reads or writes a float tensor; per-tensor: one scale per tensor."""
    from edgeft.core.errors import UserError
    from edgeft.export import keras2tflite as k

    granularity = ctx.cfg.export.int8_granularity
    conv = k.quantized_converter(ctx.model, ctx.rep_images, io=None, granularity=granularity, ops=INT16X8_OPS,
                                 label=fmt.name)
    data = k._convert(conv)   # noqa: SLF001 - the converter's C++ lines to edgeft's log, as every TFLite file's
    inside = sorted(set(k.float_ops_in_tflite(data)) - set(BOUNDARY_OPS))
    if inside:
        raise UserError(f"16x8 TFLite is not integer inside: float tensors in {', '.join(inside)}")
    if granularity == "per-tensor" and k.per_channel_tensors(data):
        raise UserError("16x8 TFLite asked per-tensor has per-channel scales: the converter did not honour it")
    ctx.made_from[fmt.name] = "ptq"
    return with_metadata(data, ctx)


@builds("tflm_int8", uses_int8_choice=True, after_write=_tflm_sources)
def tflm_int8(ctx, fmt) -> bytes:
    """The int8 TFLite file again (the same bytes), plus its TensorFlow Lite Micro sources."""
    return ctx.int8_tflite(fmt)


# ---------------------------------------------------------------- ONNX
@builds("onnx_float")
def onnx_float(ctx, fmt=None) -> bytes:
    """tf2onnx, opset 17, symbolic batch axis, labels and input contract in the metadata,
    simplified by onnxslim only where the outputs stay the same (see keras2onnx)."""
    if "onnx_float" not in ctx.cache:
        from edgeft.export.keras2onnx import labels_metadata, onnx_float_bytes

        ctx.cache["onnx_float"] = onnx_float_bytes(ctx.model, ctx.cfg.data.image_size, ctx.cfg.export.opset,
                                                   labels_metadata(ctx.labels), check_images=ctx.rep_images[:8])
    return ctx.cache["onnx_float"]


@builds("onnx_int8")
def onnx_int8(ctx, fmt) -> bytes:
    """ONNX Runtime static int8 of the float ONNX (edgeft.export.keras2onnx.DEFAULT_INT8, chosen by
    measurement: uint8 activations, int8 per-channel weights, float stem), same calibration images."""
    from edgeft.export.keras2onnx import labels_metadata, onnx_int8_bytes

    ctx.made_from[fmt.name] = "ptq"
    return onnx_int8_bytes(onnx_float(ctx), ctx.rep_images, labels_metadata(ctx.labels))


# ---------------------------------------------------------------- recovery
@builds("tflite_mixed", "onnx_mixed")
def mixed(ctx, fmt) -> bytes:
    """The mixed-precision file int8 recovery made (edgeft.pipeline.recovery, --int8-recover allow-mixed):
    never asked for by a flag, only written when its int8 row failed the gate."""
    return ctx.cache["recovered"][fmt.filename]
