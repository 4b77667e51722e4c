"""Which ops TensorFlow Lite Micro runs at 16x8 (int16 activations, int8 weights), measured.

Each case is a one- or two-layer Keras model converted by LiteRT's 16x8 mode with float32 I/O (what
`edgeft export --tflite int16x8` ships), calibrated on random pixels, then run by the installed
tflite-micro and by LiteRT's reference kernels on the same inputs: TFLM either refuses the op (its
one-line reason) or runs it, and its outputs are compared with LiteRT's (max |difference|, in the
output's own units, and in steps of the int16 output scale before the final DEQUANTIZE).

    PYTHONPATH=. python tools/tflm_int16_ops.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cases():
    from edgeft._keras import keras

    L = keras.layers
    from edgeft._keras import tf

    def tf_relu6(t):
        return tf.nn.relu6(t)

    def model(*layers, shape=(16, 16, 8)):
        x = inp = keras.Input(shape)
        for layer in layers:
            x = layer(x) if not isinstance(layer, tuple) else layer[0]([x, layer[1](x)])
        return keras.Model(inp, x)

    return {
        "CONV_2D (+ fused RELU6)": model(L.Conv2D(8, 3, padding="same"), L.ReLU(6.0)),
        "DEPTHWISE_CONV_2D (+ fused RELU6)": model(L.DepthwiseConv2D(3, padding="same"), L.ReLU(6.0)),
        "FULLY_CONNECTED": model(L.Flatten(), L.Dense(10)),
        "ADD": model((L.Add(), L.Conv2D(8, 1))),
        "MUL": model((L.Multiply(), L.Conv2D(8, 1))),
        "SUB": model((L.Subtract(), L.Conv2D(8, 1))),
        "MEAN (global average pooling)": model(L.GlobalAveragePooling2D()),
        "SOFTMAX": model(L.Flatten(), L.Dense(10), L.Softmax()),
        "AVERAGE_POOL_2D": model(L.AveragePooling2D(2)),
        "MAX_POOL_2D": model(L.MaxPooling2D(2)),
        "PAD": model(L.ZeroPadding2D(1)),
        "CONCATENATION": model((L.Concatenate(), L.Conv2D(4, 1))),
        "RESHAPE": model(L.Reshape((16 * 16 * 8,))),
        "HARD_SWISH": model(L.Conv2D(8, 1), L.Lambda(lambda t: t * tf_relu6(t + 3.0) / 6.0)),
        "LOGISTIC": model(L.Activation("sigmoid")),
        "RELU": model(L.Conv2D(8, 1), L.ReLU()),
    }


def convert(model, rep: np.ndarray) -> bytes:
    from edgeft.export import keras2tflite as k

    conv = k._converter(model)   # noqa: SLF001
    conv.optimizations = [k.tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([img[None]] for img in rep)
    conv.target_spec.supported_ops = [k.tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return k._convert(conv)   # noqa: SLF001


def measure(name: str, data: bytes, x: np.ndarray) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    from edgeft.export.tflm import TFLMRunner
    from edgeft.core.errors import UserError

    interp = Interpreter(model_content=data)
    ops = sorted({o["op_name"] for o in interp._get_ops_details()})   # noqa: SLF001
    int16 = [t for t in interp.get_tensor_details() if np.dtype(t["dtype"]) == np.int16]
    row = {"case": name, "ops": ops, "int16_tensors": len(int16)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.tflite"
        path.write_bytes(data)
        ref = Interpreter(model_path=str(path), experimental_op_resolver_type=__import__(
            "ai_edge_litert.interpreter", fromlist=["OpResolverType"]).OpResolverType.BUILTIN_REF)
        ref.allocate_tensors()
        i, o = ref.get_input_details()[0], ref.get_output_details()[0]
        want = []
        for img in x:
            ref.set_tensor(i["index"], img[None].astype(np.float32))
            ref.invoke()
            want.append(ref.get_tensor(o["index"]).reshape(-1))
        want = np.stack(want)
        try:
            runner = TFLMRunner(path)
        except UserError as e:
            return row | {"tflm": "refused", "why": str(e).split(": ", 1)[-1]}
        got = np.stack([runner.predict_one(img).reshape(-1) for img in x])
    # the int16 tensor the final DEQUANTIZE reads: its scale is one output step
    deq = [op for op in interp._get_ops_details() if op["op_name"] == "DEQUANTIZE"]   # noqa: SLF001
    step = None
    if deq:
        t = next(t for t in interp.get_tensor_details() if t["index"] == int(deq[-1]["inputs"][0]))
        step = float(t["quantization"][0]) or None
    diff = float(np.max(np.abs(got - want)))
    return row | {"tflm": "runs", "identical": bool(diff == 0.0), "max_abs_diff": diff,
                  "max_diff_steps": None if not step else round(diff / step, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for name, model in cases().items():
        shape = model.input_shape[1:]
        rep = rng.normal(0, 1, (32, *shape)).astype(np.float32)
        x = rng.normal(0, 1, (8, *shape)).astype(np.float32)
        try:
            data = convert(model, rep)
        except Exception as e:   # noqa: BLE001 - the converter's refusal is the measurement
            rows.append({"case": name, "ops": [], "tflm": "not converted",
                         "why": (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]})
        else:
            rows.append(measure(name, data, x))
        r = rows[-1]
        print(f"| {r['case']} | {', '.join(r['ops'])} | {r['tflm']} | "
              + (r.get("why", "") if r["tflm"] != "runs" else
                 f"{'identical' if r['identical'] else 'differs'}: max {r['max_abs_diff']:.2g}"
                 + (f" ({r['max_diff_steps']:g} int16 steps)" if r.get("max_diff_steps") is not None else "")) + " |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
