"""TFLite Model Metadata: every .tflite file, once `with_metadata` has run on it, loads in
MediaPipe Tasks ImageClassifier, which names the same top-1 class as LiteRT, and still carries
its labels for edgeft's own readers."""
import io
import json
import zipfile

import numpy as np
import pytest

from edgeft.core.errors import UserError
from edgeft.export.tflite_metadata import LABELS_FILE, minimum_parser_version, strip_associated_files, with_metadata
from edgeft.nn.runtime import TFLiteRunner, read_labels

TFLITE_FILES = ("model_float.tflite", "model_fp16.tflite", "model_dynamic.tflite", "model_int8.tflite")
META = dict(name="edgeft tiny digits", version="run-1", description="MobileNetV2 0.35, 32 px, digits 5-7")


def _uint8_io_model(model, rep_images: np.ndarray) -> bytes:
    """Full-integer TFLite with uint8 input and output (input scale 1, zero point 0: raw pixels)."""
    from edgeft._keras import tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([img[None]] for img in rep_images)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    return conv.convert()


@pytest.fixture(scope="module")
def val_and_files(exported_run, trained_run, tmp_path_factory):
    """(val images uint8 NHWC at the model's size, labels, {name: path of the file before metadata})."""
    from edgeft.core.config import from_yaml_file
    from edgeft.run import run_splits

    run, _ = exported_run
    splits = run_splits(from_yaml_file(run / "config.yaml"))
    files = {name: run / "export" / name for name in TFLITE_FILES}
    if TFLiteRunner(files["model_int8.tflite"]).input["dtype"] != np.uint8:
        # MediaPipe takes only uint8 or float32 input; until export writes uint8 I/O, check a
        # uint8-I/O conversion of the same run instead (representative data: training images)
        own = tmp_path_factory.mktemp("u8") / "model_int8.tflite"
        own.write_bytes(_uint8_io_model(trained_run.model, splits.train.x[::2].astype(np.float32)))
        files["model_int8.tflite"] = own
    return splits.val.x, list(splits.classes), files


def _metadata_json(data: bytes) -> dict:
    from edgeft.export.tflite_metadata import _metadata_writers

    _metadata_writers()   # imports mediapipe's metadata module the way with_metadata does
    from mediapipe.tasks.python.metadata import metadata

    return json.loads(metadata.MetadataDisplayer.with_model_buffer(data).get_metadata_json())


@pytest.mark.parametrize("name", TFLITE_FILES)
def test_mediapipe_classifier_agrees_with_litert(name, val_and_files, tmp_path):
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    images, labels, files = val_and_files
    data = with_metadata(files[name].read_bytes(), labels, **META)
    path = tmp_path / name
    path.write_bytes(data)
    runner = TFLiteRunner(path)                       # LiteRT ignores the metadata and the archive
    assert runner.input_hw == images.shape[1:3]       # both see the same pixels: no resize anywhere
    litert_top1 = [labels[i] for i in runner.predict(images.astype(np.float32)).argmax(axis=1)]
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=1)
    with vision.ImageClassifier.create_from_options(options) as clf:   # class names come from the file
        mp_top1 = [clf.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img)))
                   .classifications[0].categories[0].category_name for img in images]
    agree = np.mean([a == b for a, b in zip(mp_top1, litert_top1)])
    assert len(images) >= 12 and agree >= 0.99, (name, agree, mp_top1, litert_top1)
    assert set(mp_top1) <= set(labels)


def test_metadata_content_and_labels_read_back(val_and_files, tmp_path):
    _, labels, files = val_and_files
    for name, src in files.items():
        data = with_metadata(src.read_bytes(), labels, **META)
        lonely = tmp_path / name
        lonely.write_bytes(data)                      # no labels.txt beside it
        assert read_labels(lonely) == labels, name
        with zipfile.ZipFile(lonely) as zf:
            assert zf.namelist() == [LABELS_FILE], name   # the old appended archive was replaced
            assert zf.read(LABELS_FILE).decode().split("\n") == labels
        meta = _metadata_json(data)
        assert (meta["name"], meta["version"], meta["description"]) == (META["name"], META["version"], META["description"])
        sub = meta["subgraph_metadata"][0]
        (inp,), (out,) = sub["input_tensor_metadata"], sub["output_tensor_metadata"]
        assert inp["content"]["content_properties"]["color_space"] == "RGB"
        assert inp["process_units"][0]["options_type"] == "NormalizationOptions"
        assert inp["process_units"][0]["options"] == {"mean": [0.0], "std": [1.0]}
        assert inp["stats"] == {"min": [0.0], "max": [255.0]}
        assert out["associated_files"] == [{"name": LABELS_FILE, "type": "TENSOR_AXIS_LABELS",
                                            "description": out["associated_files"][0]["description"]}]
        assert meta["min_parser_version"] == "1.0.0"
        # the model itself is unchanged apart from the metadata buffer: LiteRT gives the same outputs
        img = np.full((1, 32, 32, 3), 128, np.float32)
        np.testing.assert_allclose(TFLiteRunner(lonely).predict(img), TFLiteRunner(src).predict(img), atol=1e-6)
        # applying it twice keeps one archive and one metadata
        again = with_metadata(data, labels, **META)
        assert strip_associated_files(again) == strip_associated_files(data)
        with zipfile.ZipFile(io.BytesIO(again)) as zf:
            assert zf.namelist() == [LABELS_FILE]


def test_bad_labels_are_user_errors(exported_run):
    run, _ = exported_run
    data = (run / "export" / "model_float.tflite").read_bytes()
    with pytest.raises(UserError, match="3 outputs but 2 labels"):
        with_metadata(data, ["a", "b"], **META)
    with pytest.raises(UserError, match="single-line"):
        with_metadata(data, ["a", "b\nc", "d"], **META)
    with pytest.raises(UserError, match="not a .tflite"):
        with_metadata(b"not a model at all", ["a", "b", "c"], **META)


def test_minimum_parser_version_follows_mediapipe_rules():
    """The stand-in for MediaPipe's compiled GetMinimumMetadataParserVersion, on metadata that
    needs 1.0.0, 1.0.1, 1.1.0, 1.2.1 and 1.5.0 (rules of mediapipe/tasks/cc/metadata/metadata_version.cc)."""
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    def buf(*, out_file_type=fb.AssociatedFileType.TENSOR_AXIS_LABELS, input_units=None, tensor_unit=None,
            custom=False):
        labels = fb.AssociatedFileT()
        labels.name, labels.type = "labels.txt", out_file_type
        inp, out = fb.TensorMetadataT(), fb.TensorMetadataT()
        out.associatedFiles = [labels]
        if tensor_unit is not None:
            unit = fb.ProcessUnitT()
            unit.optionsType, unit.options = tensor_unit, fb.RegexTokenizerOptionsT()
            inp.processUnits = [unit]
        sub = fb.SubGraphMetadataT()
        sub.inputTensorMetadata, sub.outputTensorMetadata = [inp], [out]
        sub.inputProcessUnits = input_units
        sub.customMetadata = [fb.CustomMetadataT()] if custom else None
        meta = fb.ModelMetadataT()
        meta.subgraphMetadata = [sub]
        b = flatbuffers.Builder(0)
        b.Finish(meta.Pack(b), b"M001")
        return bytes(b.Output())

    assert minimum_parser_version(buf()) == "1.0.0"
    assert minimum_parser_version(buf(out_file_type=fb.AssociatedFileType.VOCABULARY)) == "1.0.1"
    assert minimum_parser_version(buf(input_units=[])) == "1.1.0"
    assert minimum_parser_version(buf(tensor_unit=fb.ProcessUnitOptions.RegexTokenizerOptions)) == "1.2.1"
    assert minimum_parser_version(buf(custom=True, out_file_type=fb.AssociatedFileType.VOCABULARY)) == "1.5.0"


def test_strip_associated_files(tmp_path):
    model = b"TFL3" + bytes(range(256)) * 4
    assert strip_associated_files(model) == model
    path = tmp_path / "m.tflite"
    path.write_bytes(model)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("labels.txt", "a\nb\n")
    assert strip_associated_files(path.read_bytes()) == model
