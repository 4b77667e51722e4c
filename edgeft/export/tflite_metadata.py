"""Standard TFLite Model Metadata for edgeft's .tflite files.

`with_metadata` writes the metadata with MediaPipe's own image-classifier metadata writer
(`mediapipe.tasks.python.metadata.metadata_writers`), so MediaPipe Tasks `ImageClassifier` and
Android's model binding load the file and name its classes. The labels become the output
tensor's TENSOR_AXIS_LABELS file `labels.txt`, which the metadata format packs as a zip archive
appended to the model: `zipfile.ZipFile(path).read("labels.txt")` still works, so edgeft's
readers (`edgeft.nn.runtime.embedded_tflite_labels`) and LiteRT are unaffected.

Every edgeft model takes raw RGB pixels 0-255 (float32, or uint8 with scale 1 / zero point 0)
and normalizes inside the graph, so the metadata states mean 0 / std 1 and the range 0-255.

MediaPipe's pip wheels since 0.10.30 ship the metadata writers without the small compiled module
they import for one function (`_pywrap_metadata_version.GetMinimumMetadataParserVersion`); when
it is missing, `_metadata_writers` supplies that function in Python (a port of MediaPipe's
metadata_version.cc) for the duration of the import only.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import types
import zipfile

from edgeft.core.errors import UserError

LABELS_FILE = "labels.txt"
PIXEL_MEAN, PIXEL_STD = 0.0, 1.0    # raw 0-255 pixels in; the graph does its own preprocessing

_PYWRAP = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"


def with_metadata(model: bytes, labels: list[str], *, name: str, version: str, description: str) -> bytes:
    """The .tflite model with TFLite Model Metadata for an image classifier and its labels.

    `model` is the converter's output; an archive already appended to it (edgeft's older
    labels.txt, or earlier metadata's files) is dropped first, since MediaPipe refuses a file
    whose archive is not the one its metadata describes.
    """
    labels = [str(c) for c in labels]
    if not labels or any(not c.strip() or "\n" in c or "\r" in c for c in labels):
        raise UserError("TFLite metadata: labels must be non-empty single-line names")
    mw, info = _metadata_writers()
    model = strip_associated_files(model)
    n_out = _output_classes(model)
    if n_out is not None and n_out != len(labels):
        raise UserError(f"TFLite metadata: the model has {n_out} outputs but {len(labels)} labels were given")
    writer = mw.MetadataWriter.create(bytearray(model))
    writer._general_md = info.GeneralMd(name=name, version=version, description=description)  # noqa: SLF001 - add_general_info has no version
    writer.add_image_input([PIXEL_MEAN], [PIXEL_STD], color_space_type=mw.MetadataWriter.color_space_types.RGB)
    writer.add_classification_output(mw.Labels().add(labels, exported_filename=LABELS_FILE))
    data, _ = writer.populate()
    return _fixed_zip_times(bytes(data))


def _fixed_zip_times(data: bytes) -> bytes:
    """The same model and labels give the same bytes: the metadata writer stamps the appended
    archive's entries with the current time; they get a fixed one (1980-01-01, zip's epoch)."""
    model = strip_associated_files(data)
    if len(model) == len(data):
        return data
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            dst.writestr(fixed, src.read(info))
    return model + out.getvalue()


def strip_associated_files(data: bytes) -> bytes:
    """The model without the zip archive appended to it (unchanged when there is none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        return data
    if not infos:
        return data
    return data[:min(i.header_offset for i in infos)]


def _output_classes(model: bytes) -> int | None:
    """Size of the last axis of the model's first output tensor (None if not static)."""
    from mediapipe.tasks.metadata import schema_py_generated as schema

    if not schema.Model.ModelBufferHasIdentifier(model, 0):
        raise UserError("TFLite metadata: not a .tflite model")
    sub = schema.Model.GetRootAsModel(model, 0).Subgraphs(0)
    shape = sub.Tensors(sub.Outputs(0)).ShapeAsNumpy()
    return int(shape[-1]) if getattr(shape, "size", 0) and shape[-1] > 0 else None


def _metadata_writers():
    """(metadata_writer, metadata_info) modules of MediaPipe's metadata writers."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")   # mediapipe imports TensorFlow if it can
    try:
        with _min_parser_version_stand_in():
            mw = importlib.import_module("mediapipe.tasks.python.metadata.metadata_writers.metadata_writer")
            info = importlib.import_module("mediapipe.tasks.python.metadata.metadata_writers.metadata_info")
    except ImportError as e:
        raise UserError(f"writing TFLite metadata needs mediapipe ({e}): "
                        "pip install --no-deps mediapipe==1.2.3 opencv-python-headless") from None
    return mw, info


@contextlib.contextmanager
def _min_parser_version_stand_in():
    """Makes `_PYWRAP` importable while the writers are imported, when the wheel lacks it."""
    try:
        importlib.import_module(_PYWRAP)
        yield
        return
    except ModuleNotFoundError as e:
        if not (e.name and _PYWRAP.startswith(e.name)):
            raise
    added = []
    parts = _PYWRAP.split(".")
    for i in range(3, len(parts) + 1):    # mediapipe.tasks.cc ... _pywrap_metadata_version
        mod_name = ".".join(parts[:i])
        if mod_name in sys.modules:
            continue
        mod = types.ModuleType(mod_name)
        if i < len(parts):
            mod.__path__ = []
        else:
            mod.GetMinimumMetadataParserVersion = minimum_parser_version
        sys.modules[mod_name] = mod
        added.append(mod_name)
    try:
        yield
    finally:
        for mod_name in added:
            sys.modules.pop(mod_name, None)


def minimum_parser_version(metadata_buf: bytes) -> str:
    """The oldest metadata parser that reads `metadata_buf` (a ModelMetadata flatbuffer): the
    rules of MediaPipe's mediapipe/tasks/cc/metadata/metadata_version.cc, in Python."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    root = fb.ModelMetadata.GetRootAsModelMetadata(bytes(metadata_buf), 0)
    meta = fb.ModelMetadataT.InitFromObj(root)
    need = [(1, 0, 0)]

    def files(items):
        for f in items or []:
            if f.type == fb.AssociatedFileType.VOCABULARY:
                need.append((1, 0, 1))
            if f.type == getattr(fb.AssociatedFileType, "SCANN_INDEX_FILE", -1):
                need.append((1, 4, 0))
            if getattr(f, "version", None) is not None:
                need.append((1, 4, 1))

    def units(items):
        for u in items or []:
            t = u.optionsType
            if t in (fb.ProcessUnitOptions.BertTokenizerOptions, fb.ProcessUnitOptions.SentencePieceTokenizerOptions):
                need.append((1, 1, 0))
            if t == fb.ProcessUnitOptions.RegexTokenizerOptions:
                need.append((1, 2, 1))

    def tensors(items):
        for t in items or []:
            files(t.associatedFiles)
            units(t.processUnits)
            if t.content is not None and t.content.contentPropertiesType == fb.ContentProperties.AudioProperties:
                need.append((1, 3, 0))

    for sg in meta.subgraphMetadata or []:
        tensors(sg.inputTensorMetadata)
        tensors(sg.outputTensorMetadata)
        files(sg.associatedFiles)
        for field in ("inputProcessUnits", "outputProcessUnits"):
            if getattr(sg, field) is not None:
                need.append((1, 1, 0))
                units(getattr(sg, field))
        for field in ("inputTensorGroups", "outputTensorGroups"):
            if getattr(sg, field, None) is not None:
                need.append((1, 2, 0))
        if getattr(sg, "customMetadata", None) is not None:
            need.append((1, 5, 0))
    files(meta.associatedFiles)
    return ".".join(map(str, max(need)))
