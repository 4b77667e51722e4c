"""The runtime layer: no TensorFlow, one quantization rule, evaluate/predict agree with Keras."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO, run_cli
from edgeft.nn.runtime import dequantize, quantize


def test_quantize_round_trip():
    x = np.array([0.0, 1.0, 127.5, 255.0], np.float32)
    q = quantize(x, np.int8, 1.0, -128)
    assert q.dtype == np.int8 and q.tolist() == [-128, -127, 0, 127]   # 127.5 - 128 rounds half to even
    np.testing.assert_allclose(dequantize(q, 1.0, -128), [0, 1, 128, 255])
    assert quantize(np.array([1e6]), np.uint8, 1.0, 0)[0] == 255        # clipped, not wrapped


def test_runtime_imports_without_tensorflow(exported_run, tmp_path):
    run, _ = exported_run
    fake = tmp_path / "fake"
    for name in ("tensorflow", "tf_keras"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text("raise ImportError('no tensorflow on this device')\n")
    code = ("import sys, numpy as np\n"
            "from edgeft.nn.runtime import open_runner, read_labels\n"
            "from edgeft.verify.evaluate import evaluate\n"
            f"x = np.full((2, 32, 32, 3), 128, np.float32)\n"
            f"for f in ('model_int8.tflite', 'model.onnx', 'model_int8.onnx'):\n"
            f"    p = open_runner(r'{run}/export/' + f).predict(x)\n"
            "    assert p.shape == (2, 3)\n"
            "assert 'tensorflow' not in sys.modules and 'tf_keras' not in sys.modules\n"
            "print('NO-TF-OK')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "NO-TF-OK" in r.stdout, r.stderr[-2000:]
    control = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, env=env)
    assert control.returncode != 0   # the fake really blocks TensorFlow


def test_evaluate_exported_file_agrees_with_keras(exported_run, image_folder):
    from edgeft.verify.evaluate import evaluate

    run, _ = exported_run
    # every image of the folder, those the run trained on included (evaluate leaves them out by default)
    keras_acc = evaluate(run / "model.keras", image_folder, include_trained=True)["accuracy"]
    for name, tol in (("model_float.tflite", 0.0), ("model_int8.tflite", 0.02), ("model_int8.onnx", 0.02)):
        r = evaluate(run / "export" / name, image_folder, include_trained=True)
        assert abs(r["accuracy"] - keras_acc) <= tol + 1e-9, (name, r["accuracy"], keras_acc)
        assert r["n"] == 72 and (run / "export" / f"eval_{name.rsplit('.', 1)[0]}" / "confusion_matrix.png").is_file()


def test_predict_cli_prints_top_k_labels(exported_run, image_folder):
    run, _ = exported_run
    img = sorted((image_folder / "seven").glob("*.png"))[0]
    r = run_cli("predict", run / "export" / "model_int8.tflite", img, "--top-k", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith(str(img)) and line.split(": ")[1].startswith("seven")
    bad = run_cli("predict", run / "export" / "model_int8.tflite", "/no/such.png")
    assert bad.returncode == 2 and "/no/such.png not found" in bad.stderr


def test_predict_takes_folders_and_checks_top_k(exported_run, image_folder):
    run, _ = exported_run
    model = run / "export" / "model_int8.tflite"
    r = run_cli("predict", model, image_folder / "seven", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout[r.stdout.index("["):])
    assert [x["image"] for x in results] == sorted(str(p) for p in (image_folder / "seven").glob("*.png"))
    assert sum(x["top"][0]["label"] == "seven" for x in results) >= 0.8 * len(results)
    assert len(results[0]["top"]) == 3
    bad = run_cli("predict", model, image_folder / "seven", "--top-k", "0")
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr and "Traceback" not in bad.stderr


def test_package_and_device_script_share_one_implementation():
    """images, runtime and the device script (tools/edgeft_device.py) are one code path."""
    from edgeft import device
    from edgeft.data import images
    from edgeft.nn import runtime

    assert images.load_image is device.load_image and images.IMAGE_EXTS is device.IMAGE_EXTS
    assert runtime.quantize is device.quantize and runtime.dequantize is device.dequantize
    assert runtime.OnnxRunner is device.OnnxRunner
    # the package's LiteRT runner is the device's, its construction's native banner kept off the console
    assert issubclass(runtime.TFLiteRunner, device.TFLiteRunner)
    assert set(vars(runtime.TFLiteRunner)) - {"__module__", "__doc__", "__init__", "__qualname__"} == set()
    assert (REPO / "tools" / "edgeft_device.py").resolve() == (REPO / "edgeft" / "device.py").resolve()


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from edgeft.data.images import load_image

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 60000, np.uint16)).save(deep)
    with Image.open(deep) as img:
        assert img.mode.startswith("I")
    assert load_image(deep, 4).tolist() == np.full((4, 4, 3), 233, np.uint8).tolist()   # 60000/65535*255


def test_bad_model_files_are_one_line_user_errors(tmp_path, image_folder):
    import pytest

    from edgeft.core.errors import UserError
    from edgeft.nn.runtime import open_runner, read_labels

    (tmp_path / "corrupt.tflite").write_text("not a model")
    (tmp_path / "corrupt.onnx").write_text("not a model")
    for name in ("corrupt.tflite", "corrupt.onnx", "missing.tflite", "model.pb"):
        with pytest.raises(UserError, match="cannot load|not found|unsupported model type"):
            open_runner(tmp_path / name)
    with pytest.raises(UserError, match="cannot load"):
        read_labels(tmp_path / "corrupt.onnx")
    img = sorted((image_folder / "six").glob("*.png"))[0]
    r = run_cli("predict", tmp_path / "corrupt.onnx", img)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]   # warnings may come first
    assert len(errors) == 1 and "cannot load" in errors[0], r.stderr
