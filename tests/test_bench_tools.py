"""The device-side benchmark scripts tools/bench_tflite.py and
tools/bench_onnx.py, run the way a user runs them on a Raspberry Pi: each
script copied alone into a folder and started with a Python in which
TensorFlow (and tf_keras, edgeft) cannot be imported."""

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SCRIPTS = {"tflite": "bench_tflite.py", "onnx": "bench_onnx.py"}
BLOCKED = ("tensorflow", "tf_keras", "edgeft")
BLOCKED_MESSAGE = "tensorflow is not available on this device"
SIZE = 32
CLASSES = ("a", "b", "c")  # dominant red, green, blue channel
# Same images under other names: sorted folder order (blue, green, red)
# differs from class order, so only real label mapping scores well.
NAMED = ("red", "green", "blue")
PER_CLASS = 10
FAST = ("--runs", "10", "--warmup", "2")


def class_images(rng, channel, count):
    """uint8 images whose `channel` clearly dominates the other two."""
    images = rng.uniform(0, 90, (count, SIZE, SIZE, 3))
    images[..., channel] = rng.uniform(160, 255, (count, SIZE, SIZE))
    return images.astype(np.uint8)


def write_dataset(root, names, images):
    for name, batch in zip(names, images):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(batch):
            Image.fromarray(image).save(root / name / f"{i:02d}.png")


def trained_model(x, y):
    import tf_keras as keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Rescaling(1 / 127.5, offset=-1),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(CLASSES), activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(0.01),
                  "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=30, batch_size=10, verbose=0)
    return model


def tflite_bytes(model, x=None):
    """Float TFLite, or full-int8 (int8 in/out) when calibration `x` is given."""
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if x is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([s[None]] for s in x)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def save_onnx(model, path, labels):
    import onnx
    import tensorflow as tf
    import tf2onnx
    spec = [tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="input")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "labels", json.dumps(labels)
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Data folders and a trained model exported as float TFLite, int8
    TFLite and ONNX, with labels.txt beside them."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
    pytest.importorskip("tf2onnx")

    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    images = [class_images(rng, c, PER_CLASS) for c in range(len(CLASSES))]
    write_dataset(root / "data", CLASSES, images)
    write_dataset(root / "named", NAMED, images)
    (root / "data" / "a" / "broken.jpg").write_text("not an image")
    (root / "data" / "a" / "notes.txt").write_text("ignored: not an image")
    (root / "empty" / "a").mkdir(parents=True)

    x = np.concatenate(images).astype(np.float32)
    y = np.repeat(np.arange(len(CLASSES)), PER_CLASS)
    model = trained_model(x, y)
    models = root / "models"
    models.mkdir()
    (models / "model.tflite").write_bytes(tflite_bytes(model))
    (models / "model_int8.tflite").write_bytes(tflite_bytes(model, x))
    # Metadata names differ from labels.txt on purpose: it shows which wins.
    save_onnx(model, models / "model.onnx", list(NAMED))
    (models / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    for suffix in (".tflite", ".onnx"):
        (models / f"corrupt{suffix}").write_text("not a model")

    # Copies without labels.txt beside them.
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(models / "model.onnx", bare)
    shutil.copy(models / "model.tflite", bare)
    # A copy whose labels.txt names the classes after their colour.
    named = root / "named_models"
    named.mkdir()
    shutil.copy(models / "model.tflite", named)
    (named / "labels.txt").write_text("\n".join(NAMED) + "\n")
    # A copy carrying its labels inside (a zip archive appended, as edgeft export writes).
    embedded = root / "embedded"
    embedded.mkdir()
    shutil.copy(models / "model.tflite", embedded)
    with zipfile.ZipFile(embedded / "model.tflite", "a") as zf:
        zf.writestr("labels.txt", "\n".join(NAMED) + "\n")
    return root


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """(folder holding only the two scripts, environment without TF)."""
    root = tmp_path_factory.mktemp("device")
    blocker = root / "blocked"
    for name in BLOCKED:
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(
            f"raise ImportError({BLOCKED_MESSAGE!r})\n")
    scripts = root / "scripts"
    scripts.mkdir()
    for script in SCRIPTS.values():
        shutil.copy(TOOLS / script, scripts)
    env = dict(os.environ, PYTHONPATH=str(blocker), PYTHONDONTWRITEBYTECODE="1")
    return scripts, env


def run(device, args):
    folder, env = device
    return subprocess.run([sys.executable, *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


def bench(device, fmt, *args):
    return run(device, [SCRIPTS[fmt], *map(str, args)])


def report_of(device, fmt, model, *args, tmp_path):
    """Runs a script that must succeed and returns (JSON report, stdout)."""
    out = tmp_path / "out.json"
    done = bench(device, fmt, model, *args, *FAST, "--json", out)
    assert done.returncode == 0, done.stderr
    # Atomic write leaves no temp file behind.
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    return json.loads(out.read_text()), done.stdout


def check_report(report, stdout, model, fmt, threads):
    assert report["model"] == str(model)
    assert report["format"] == fmt
    assert report["runtime"] and report["runtime_version"]
    assert report["size_bytes"] == os.path.getsize(model)
    assert report["size_mb"] == pytest.approx(report["size_bytes"] / 2**20)
    assert report["load_ms"] > 0
    assert report["input"]["shape"] == [1, SIZE, SIZE, 3]
    assert report["python"] == platform.python_version()
    assert report["machine"]["machine"] == platform.machine()
    assert report["machine"]["cpu_count"] == os.cpu_count()
    assert report["peak_rss_mb"] > 0
    assert [r["threads"] for r in report["results"]] == threads
    for result in report["results"]:
        lat = result["latency_ms"]
        assert (result["runs"], result["warmup"]) == (10, 2)
        assert 0 <= result["outliers_removed"] < result["runs"]
        assert lat["mean"] > 0 and lat["std"] >= 0
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["min"] <= lat["mean"] <= lat["max"]
        assert result["throughput_ips"] == pytest.approx(1000 / lat["mean"])
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if line.lstrip().startswith("threads"))
    assert "p99_ms" in lines[header]
    rows = lines[header + 1:header + 1 + len(threads)]
    assert [row.split()[0] for row in rows] == [str(t) for t in threads]


def check_accuracy(report, minimum):
    acc = report["accuracy"]
    assert acc["n"] == len(CLASSES) * PER_CLASS
    assert acc["top1"] == pytest.approx(acc["correct"] / acc["n"])
    assert acc["top1"] >= minimum
    assert sum(c["n"] for c in acc["per_class"].values()) == acc["n"]
    assert list(acc["per_class"]) == report["labels"]


def test_device_env_cannot_import_tensorflow(device):
    """Negative control: without it the no-TensorFlow tests prove nothing."""
    for name in BLOCKED:
        done = run(device, ["-c", f"import {name}"])
        assert done.returncode != 0
        assert BLOCKED_MESSAGE in done.stderr


@pytest.mark.parametrize("fmt, model, minimum", [
    ("tflite", "model.tflite", 0.9),
    ("tflite", "model_int8.tflite", 0.8),
    ("onnx", "model.onnx", 0.9),
])
def test_data_report(assets, device, tmp_path, fmt, model, minimum):
    model = assets / "models" / model
    report, stdout = report_of(device, fmt, model, "--data", assets / "data",
                               "--threads", 1, 2, tmp_path=tmp_path)
    check_report(report, stdout, model, fmt, [1, 2])
    check_accuracy(report, minimum)
    # labels.txt beside the model wins over ONNX metadata and folder names.
    assert (report["labels"], report["labels_source"]) == (list(CLASSES),
                                                           "labels.txt")
    assert report["data"]["unreadable"] == 1
    assert "top-1" in stdout


def test_int8_input_quantization_is_reported(assets, device, tmp_path):
    report, _ = report_of(device, "tflite", assets / "models" / "model_int8.tflite",
                          tmp_path=tmp_path)
    assert report["input"]["dtype"] == "int8"
    assert report["input"]["quantization"]["scale"] > 0
    assert report["output"]["quantization"] is not None


def test_onnx_labels_from_metadata(assets, device, tmp_path):
    model = assets / "bare" / "model.onnx"
    report, stdout = report_of(device, "onnx", model, "--data", assets / "named",
                               tmp_path=tmp_path)
    check_report(report, stdout, model, "onnx", [1])
    assert (report["labels"], report["labels_source"]) == (list(NAMED),
                                                           "metadata")
    check_accuracy(report, 0.9)


@pytest.mark.parametrize("models, source", [("named_models", "labels.txt"),
                                            ("embedded", "embedded labels.txt"),
                                            ("bare", "folders")])
def test_tflite_labels_txt_maps_folders(assets, device, tmp_path, models,
                                        source):
    """Folders named red/green/blue sort differently from the class order;
    only labels.txt (beside the model or inside it) maps them right (the bare
    copy proves the test bites)."""
    model = assets / models / "model.tflite"
    report, _ = report_of(device, "tflite", model, "--data", assets / "named",
                          tmp_path=tmp_path)
    minimum_ok = source != "folders"
    assert (report["accuracy"]["top1"] >= 0.9) is minimum_ok
    expected = list(NAMED) if minimum_ok else sorted(NAMED)
    assert (report["labels"], report["labels_source"]) == (expected, source)


@pytest.mark.parametrize("fmt, model, args", [
    ("tflite", "model.tflite", ["--random"]),
    ("tflite", "model_int8.tflite", []),  # --random is the default
    ("onnx", "model.onnx", ["--random", "--threads", "2", "1"]),
])
def test_random_has_no_accuracy(assets, device, tmp_path, fmt, model, args):
    model = assets / "models" / model
    report, stdout = report_of(device, fmt, model, *args, tmp_path=tmp_path)
    threads = [2, 1] if "--threads" in args else [1]
    check_report(report, stdout, model, fmt, threads)
    assert report["accuracy"] is None and report["data"] is None


@pytest.mark.parametrize("fmt", SCRIPTS)
def test_help_documents_every_flag(device, fmt):
    done = bench(device, fmt, "--help")
    assert done.returncode == 0
    for flag in ("--data", "--random", "--threads", "--runs", "--warmup",
                 "--limit", "--seed", "--json"):
        assert flag in done.stdout


def test_limit_caps_images_across_classes(assets, device, tmp_path):
    report, _ = report_of(device, "tflite", assets / "models" / "model.tflite",
                          "--data", assets / "data", "--limit", 6,
                          tmp_path=tmp_path)
    assert report["accuracy"]["n"] == 6
    assert {c["n"] for c in report["accuracy"]["per_class"].values()} == {2}


BAD_INPUTS = [
    ("tflite", ["{root}/models/missing.tflite"]),
    ("tflite", ["{root}/models/model.onnx"]),
    ("onnx", ["{root}/models/model.tflite"]),
    ("onnx", ["{root}/models/model.onnx", "--data", "{root}/no_such_folder"]),
    ("tflite", ["{root}/models/model.tflite", "--data", "{root}/empty"]),
    ("tflite", ["{root}/models/model.tflite", "--threads", "0"]),
    ("onnx", ["{root}/models/model.onnx", "--threads", "1", "two"]),
    ("tflite", ["{root}/models/model.tflite", "--runs", "-3"]),
    ("tflite", ["{root}/models/corrupt.tflite"]),
    ("onnx", ["{root}/models/corrupt.onnx"]),
    ("tflite", ["{root}/bare/model.tflite", "--data", "{root}/data",
                "--random"]),
    ("onnx", ["{root}/models/model.onnx", "--json", "{root}/nowhere/o.json"]),
    # Folder names that labels.txt does not list.
    ("tflite", ["{root}/models/model.tflite", "--data", "{root}/named"]),
]


@pytest.mark.parametrize("fmt, args", BAD_INPUTS)
def test_bad_input_exits_2_without_traceback(assets, device, fmt, args):
    done = bench(device, fmt, *(a.format(root=assets) for a in args))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, done.stderr
