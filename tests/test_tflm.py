"""TensorFlow Lite Micro export: the C sources hold the model and its ops, the arena is measured,
and the TFLM interpreter gives the same answers as LiteRT."""
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("tflite_micro", reason="tflite-micro is not installed")

from edgeft.core.errors import UserError   # noqa: E402
from edgeft.nn.runtime import TFLiteRunner, dequantize, quantize   # noqa: E402
from edgeft.export.tflm import (RESOLVER_METHODS, TFLMRunner, _loads_isolated, _runtime, flatbuffer_bytes,   # noqa: E402
                         labels_h, probe, write_tflm)


@pytest.fixture(scope="module")
def tflm(exported_run, tmp_path_factory):
    run, _ = exported_run
    model = run / "export" / "model_int8.tflite"
    labels = (run / "export" / "labels.txt").read_text().split()
    out = tmp_path_factory.mktemp("tflm") / "tflm"
    return model, out, labels, write_tflm(model, out, labels)


def c_bytes(cc: str) -> bytes:
    body = re.search(r"g_model_data\[\] = \{(.*?)\};", cc, re.S).group(1)
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body))


def test_c_array_is_exactly_the_flatbuffer(tflm):
    model, out, _, info = tflm
    data = model.read_bytes()
    cc = (out / "model_data.cc").read_text()
    arr = c_bytes(cc)
    assert "alignas(16) const unsigned char g_model_data[]" in cc
    assert int(re.search(r"g_model_data_len = (\d+);", cc).group(1)) == len(arr) == info["flash_bytes"]
    # the labels archive edgeft appends is stripped: the array is a proper prefix, ending where the zip begins
    assert arr == flatbuffer_bytes(data) and data.startswith(arr) and len(arr) < len(data)
    assert data[len(arr):len(arr) + 4] == b"PK\x03\x04"
    # nothing of the model was cut: the stripped flatbuffer gives LiteRT's answers bit for bit
    from ai_edge_litert.interpreter import Interpreter

    full, stripped = Interpreter(model_content=data), Interpreter(model_content=arr)
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    outs = []
    for interp in (full, stripped):
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0], interp.get_output_details()[0]
        interp.set_tensor(i["index"], quantize(x, i["dtype"], *i["quantization"]))
        interp.invoke()
        outs.append(interp.get_tensor(o["index"]))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_op_resolver_lists_exactly_the_models_ops(tflm):
    model, out, _, info = tflm
    from ai_edge_litert.interpreter import Interpreter

    litert_ops = {op["op_name"] for op in Interpreter(model_path=str(model))._get_ops_details()}  # noqa: SLF001
    text = (out / "op_resolver.h").read_text()
    calls = re.findall(r"resolver\.(Add\w+)\(\)\);\s*// (\w+)", text)
    assert {op for _, op in calls} == litert_ops == set(info["ops"])
    assert len(calls) == len(litert_ops)   # each op once
    assert all(method == RESOLVER_METHODS[op] for method, op in calls)
    assert "MicroMutableOpResolver<kModelOpCount>" in text
    assert int(re.search(r"kModelOpCount = (\d+);", text).group(1)) == len(litert_ops)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "SOFTMAX"} <= litert_ops


def test_readme_states_the_returned_numbers(tflm):
    model, out, labels, info = tflm
    readme = (out / "README.md").read_text()

    def cell(key):
        return re.search(rf"^\| {key}(?!\w)[^|]*\| (.+) \|$", readme, re.M).group(1)

    assert int(cell("flash_bytes")) == info["flash_bytes"]
    assert int(cell("arena_bytes")) == info["arena_bytes"]
    assert int(cell("arena_recorded_bytes")) == info["arena_recorded_bytes"]
    assert cell(r"ops \(\d+\)").split(", ") == info["ops"]
    # I/O quantization: TFLM's view, as LiteRT reads it from the same file
    lite = TFLiteRunner(model)
    for side, details in (("input", lite.input), ("output", lite.output)):
        q = info[side]
        assert q["dtype"] == np.dtype(details["dtype"]).name in ("int8", "uint8")
        assert (q["scale"], q["zero_point"]) == pytest.approx(details["quantization"])
        assert q["shape"] == list(details["shape"])
        assert cell(side) == f"shape {q['shape']}, {q['dtype']}, scale {q['scale']!r}, zero_point {q['zero_point']}"
    assert re.findall(r'^    "(.*)",$', (out / "labels.h").read_text(), re.M) == labels


def test_model_runs_in_the_measured_arena_and_not_in_less(tflm):
    model, _, _, info = tflm
    arena = info["arena_bytes"]
    assert 0 < info["arena_recorded_bytes"] <= arena < 4 * info["arena_recorded_bytes"]
    fb = flatbuffer_bytes(model.read_bytes())
    assert _loads_isolated(_runtime(), fb, arena) and not _loads_isolated(_runtime(), fb, arena - 1)
    probs = TFLMRunner(model, arena_size=arena).predict(np.full((2, 32, 32, 3), 128, np.float32))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(-1), 1, atol=0.05)


def test_tflm_gives_litert_answers(tflm, image_folder):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgeft.data.images import load_image

    model = tflm[0]
    x = np.stack([load_image(p, 32) for p in sorted(image_folder.rglob("*.png"))]).astype(np.float32)
    runner = TFLMRunner(model)
    assert runner.input_hw == (32, 32) and runner.arena_size == tflm[3]["arena_bytes"]
    probs = runner.predict(x)
    lite = TFLiteRunner(model).predict(x)
    assert len(x) >= 48 and np.mean(probs.argmax(-1) == lite.argmax(-1)) >= 0.98
    # TFLM's kernels are TFLite's reference kernels: bit-exact with LiteRT's reference op resolver
    # (LiteRT's default optimized kernels round a little differently)
    ref = Interpreter(model_path=str(model), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    ref.allocate_tensors()
    i, o = ref.get_input_details()[0], ref.get_output_details()[0]
    for img, p in zip(x[:24], probs):
        ref.set_tensor(i["index"], quantize(img[None], i["dtype"], *i["quantization"]))
        ref.invoke()
        np.testing.assert_array_equal(dequantize(ref.get_tensor(o["index"]), *o["quantization"])[0], p)


@pytest.fixture(scope="module")
def gelu_model(tmp_path_factory):
    """A tiny full-int8 model with GELU, which LiteRT runs and TFLite Micro has no kernel for."""
    from edgeft._keras import keras, tf

    inp = keras.Input((8,))
    x = keras.layers.Dense(8)(inp)
    x = keras.layers.Lambda(tf.nn.gelu)(x)
    m = keras.Model(inp, keras.layers.Dense(3)(x))
    conv = tf.lite.TFLiteConverter.from_keras_model(m)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.normal(size=(1, 8)).astype(np.float32)] for _ in range(16))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    path = tmp_path_factory.mktemp("gelu") / "gelu.tflite"
    path.write_bytes(conv.convert())
    return path


def test_op_tflm_lacks_is_a_one_line_user_error(gelu_model, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    assert "GELU" in {op["op_name"] for op in Interpreter(model_path=str(gelu_model))._get_ops_details()}  # noqa: SLF001
    with pytest.raises(UserError, match="GELU") as e:
        write_tflm(gelu_model, tmp_path / "tflm", ["a", "b", "c"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "tflm").exists()
    # the TFLM interpreter itself (not only edgeft's resolver table) refuses it, naming the op
    with pytest.raises(UserError, match="no kernel for op GELU"):
        probe(gelu_model)
    with pytest.raises(UserError, match="GELU"):
        TFLMRunner(gelu_model)


def test_label_count_must_match_the_outputs(tflm, tmp_path):
    with pytest.raises(UserError, match="2 labels for 3 model outputs"):
        write_tflm(tflm[0], tmp_path / "tflm", ["a", "b"])


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++) on this machine")
def test_sources_compile_and_hold_the_model(tflm, tmp_path):
    """model_data.cc compiles; a program linked with it sees the exact bytes, 16-byte aligned,
    and labels.h gives back any label (quotes, backslashes, UTF-8) unchanged."""
    model, out, _, info = tflm
    odd = ["five", 'say "hi"', "back\\slash", "café1", "tab\there"]
    (tmp_path / "labels.h").write_text(labels_h(odd))
    (tmp_path / "main.cc").write_text(
        '#include <cstdint>\n#include <cstdio>\n#include "model_data.h"\n#include "labels.h"\n'
        "int main() {\n  unsigned long h = 0;\n"
        "  for (unsigned int i = 0; i < g_model_data_len; ++i) h = (h * 31 + g_model_data[i]) % 1000000007UL;\n"
        '  std::printf("%u %lu %d\\n", g_model_data_len, h, (int)(reinterpret_cast<std::uintptr_t>(g_model_data) % 16));\n'
        '  for (int i = 0; i < kLabelCount; ++i) std::printf("%s\\n", kLabels[i]);\n}\n')
    obj = tmp_path / "model_data.o"
    subprocess.run(["g++", "-std=c++17", "-c", str(out / "model_data.cc"), "-o", str(obj)], check=True)
    subprocess.run(["g++", "-std=c++17", f"-I{out}", f"-I{tmp_path}", str(tmp_path / "main.cc"), str(obj),
                    "-o", str(tmp_path / "main")], check=True)
    lines = subprocess.run([str(tmp_path / "main")], capture_output=True, check=True).stdout.decode().split("\n")
    h = 0
    for b in flatbuffer_bytes(model.read_bytes()):
        h = (h * 31 + b) % 1000000007
    assert lines[0] == f"{info['flash_bytes']} {h} 0"
    assert lines[1:1 + len(odd)] == odd
