"""The per-layer error report for an ONNX int8 file, through onnxruntime.quantization.qdq_loss_debug.

ONNX Runtime's tool saves every activation of the float model and of the QDQ model on the same
inputs (`modify_model_output_intermediate_tensors`, `collect_activations`) and pairs them
(`create_activation_matching`: each activation before and after its QuantizeLinear/DequantizeLinear
pair, and in the float model); `create_weight_matching` pairs each weight with its dequantized
copy. Unlike TFLite's debugger it has no float twin per op, so an activation's error there is
accumulated from everything before it (reported beside); an op's own part is its weights'
quantization noise (`compute_weight_error`) plus its output's rounding and clipping (the activation
before and after its QDQ pair), both as noise / signal. The top ops are confirmed as for TFLite,
by quantizing again with that one node left in float (`nodes_to_exclude`) and measuring the
output error that goes away. Same report layout as edgeft.quantize.int8_report.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgeft.quantize.int8_report import CONFIRM, REPORT_INPUTS, _candidates, _confirmation, _ranked, _shares


def _nsr(ref: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """(noise / signal, rmse) of `other` against `ref`, over all the images."""
    a = np.concatenate([np.asarray(r, np.float64).ravel() for r in ref])
    b = np.concatenate([np.asarray(o, np.float64).ravel() for o in other])
    mse = float(np.mean((a - b) ** 2))
    var = float(np.var(a))
    return (mse / var if var > 0 else (0.0 if mse == 0 else float("inf"))), float(np.sqrt(mse))


def _reader(name: str, x: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: img[None]} for img in x])

        def get_next(self):
            return next(self.items, None)

        def __iter__(self):   # collect_activations iterates the reader
            return iter(self.get_next, None)

    return Reader()


def _probs(data: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([np.asarray(sess.run(None, {name: img[None]})[0], np.float64) for img in x])


def _output_error(data: bytes, x: np.ndarray, float_probs: np.ndarray) -> dict:
    probs = _probs(data, x)
    return {"prob_rmse": float(np.sqrt(np.mean((probs - float_probs) ** 2))),
            "top1_agreement": float(np.mean(probs.argmax(-1) == float_probs.argmax(-1)))}


def _quant_ranges(proto) -> dict[str, tuple[float, float]]:
    """Activation name -> the range its QuantizeLinear covers."""
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[1] not in init:
            continue
        scale = float(np.asarray(init[node.input[1]]).ravel()[0])
        zp_arr = init.get(node.input[2]) if len(node.input) > 2 else None
        zp = int(np.asarray(zp_arr).ravel()[0]) if zp_arr is not None else 0
        info = np.iinfo(np.uint8 if zp_arr is None or zp_arr.dtype == np.uint8 else zp_arr.dtype)
        out[node.input[0]] = (scale, (info.min - zp) * scale, (info.max - zp) * scale)
    return out


def onnx_layers(float_onnx: bytes, rep_images: np.ndarray, val_images: np.ndarray, float_probs: np.ndarray,
                variant: str | None = None, kernels: dict[str, np.ndarray] | None = None, confirm: int = CONFIRM,
                n_inputs: int = REPORT_INPUTS) -> dict:
    """The per-node report of the ONNX int8 quantization of `float_onnx` (edgeft.export.keras2onnx,
    `variant`, calibrated on all of `rep_images`), measured on the first `n_inputs` calibration and
    validation images; `float_probs`: the float Keras model's outputs on `val_images`; `kernels`:
    the Keras layers' kernels by layer name (edgeft.quantize.int8_report.keras_kernels), to name nodes."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import qdq_loss_debug as qdq

    from edgeft.core.progress import step
    from edgeft.export.keras2onnx import DEFAULT_INT8, onnx_int8_bytes

    variant = variant or DEFAULT_INT8
    cal = np.asarray(rep_images[:n_inputs], np.float32)
    val = np.asarray(val_images[:n_inputs], np.float32)
    float_probs = np.asarray(float_probs[:len(val)], np.float64)
    with step("export", "int8 report: ONNX activations (qdq_loss_debug)", key="int8 report onnx"):
        int8 = onnx_int8_bytes(float_onnx, rep_images, {}, variant)
        with tempfile.TemporaryDirectory(prefix="edgeft-qdq-debug-") as tmp:
            paths = {k: Path(tmp) / f"{k}.onnx" for k in ("float", "int8", "float_aug", "int8_aug")}
            paths["float"].write_bytes(float_onnx)
            paths["int8"].write_bytes(int8)
            for k in ("float", "int8"):
                qdq.modify_model_output_intermediate_tensors(str(paths[k]), str(paths[f"{k}_aug"]))
            name = onnx.load(str(paths["float"])).graph.input[0].name
            # every intermediate tensor of every input is held at once (EfficientNet-Lite0 at 128 px:
            # 9.6 GB peak for 64 + 64 inputs): as many inputs as a quarter of the free memory holds
            n = _inputs_that_fit(paths, name, cal[:1], len(cal))
            cal, val, float_probs = cal[:n], val[:n], float_probs[:n]
            matches = {}
            for which, x in (("calibration", cal), ("validation", val)):   # one set of activations at a time
                acts = {k: qdq.collect_activations(str(paths[f"{k}_aug"]), _reader(name, x)) for k in ("float", "int8")}
                matches[which] = qdq.create_activation_matching(acts["int8"], acts["float"])
                del acts
            pairs = qdq.create_weight_matching(str(paths["float"]), str(paths["int8"]))
            weights = qdq.compute_weight_error(pairs)
            ranges = _quant_ranges(onnx.load(str(paths["int8"])))
            graph = onnx.load(str(paths["float"])).graph
    layers = _node_layers(graph, matches, weights, ranges, kernels or {}, pairs)
    _shares(layers)
    with step("export", "int8 report: the top ONNX nodes kept in float, one at a time", key="int8 report onnx confirm"):
        base = _output_error(int8, val, float_probs)
        confirmed = [_confirmation(layer, _output_error(onnx_int8_bytes(float_onnx, rep_images, {}, variant,
                                                                        keep_float=(layer["node"],)),
                                                        val, float_probs), base)
                     for layer in _candidates(layers, confirm)]
    return {"tool": f"onnxruntime.quantization.qdq_loss_debug (ONNX Runtime {onnxruntime.__version__})",
            "granularity": variant, "io": "float",
            "inputs": {"calibration": int(len(cal)), "validation": int(len(val))},
            "output_error": base, "layers": layers, "top": _ranked(confirmed)}


MIN_REPORT_INPUTS = 8


def _inputs_that_fit(paths: dict, name: str, one: np.ndarray, wanted: int) -> int:
    """How many inputs the activation collection may hold: the instrumented float and int8 models'
    outputs on one input, times three (the collection, its matching, the error arrays), within a
    quarter of the memory free now; at least MIN_REPORT_INPUTS, at most `wanted`."""
    import onnxruntime as ort

    from edgeft.data.cache import available_memory

    per = 0
    for k in ("float_aug", "int8_aug"):
        sess = ort.InferenceSession(str(paths[k]), providers=["CPUExecutionProvider"])
        per += sum(np.asarray(o).nbytes for o in sess.run(None, {name: one}))
    free = available_memory()
    if free is None or per == 0:
        return wanted
    return int(max(MIN_REPORT_INPUTS, min(wanted, 0.25 * free // (3 * per))))


WEIGHTED = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish"}   # fused into the op before


def _by_values(kernels: dict[str, np.ndarray]) -> dict[int, list[tuple[str, np.ndarray]]]:
    """Keras kernels by size, each as its sorted values: tf2onnx renames every node (and edgeft
    renames them again by position), so a weighted node is told by its weights' values, whatever
    their layout ((H, W, I, O) in Keras, (O, I, H, W) in ONNX)."""
    out: dict[int, list] = {}
    for name, k in kernels.items():
        out.setdefault(int(k.size), []).append((name, np.sort(np.asarray(k, np.float32).ravel())))
    return out


def _layer_name(node, inits: dict, kernels: dict, fallback: str) -> str:
    for i in node.input:
        w = inits.get(i)
        if w is None:
            continue
        values = np.sort(np.asarray(w, np.float32).ravel())
        for name, k in kernels.get(int(values.size), []):
            if np.allclose(values, k, rtol=1e-5, atol=1e-6):
                return name
    return fallback


ADDITIVE = {"Add", "Sub"}   # a constant input is added to the output: its rounding error is added, not scaled


def _constant_noise(node, pairs: dict | None, weights: dict, out_var: float) -> float:
    """The noise / signal a node's quantized constant inputs add to its output. A conv / matmul
    kernel's relative error is the output's (qdq_loss_debug's weight SQNR); a constant that is added
    (a bias after a MatMul: tf2onnx writes Dense as MatMul + Add) adds its own rounding error to an
    output of its own variance: its SQNR would measure the bias against itself (on the real emoji
    Lite0: 15.9, 99.9 % of the summed noise / signal, where keeping that Add float removed 0 % of the
    output error)."""
    total = 0.0
    for name in node.input:
        if name not in weights:
            continue
        pair = (pairs or {}).get(name)
        if node.op_type in ADDITIVE and pair is not None and pair.get("dequantized") is not None:
            err = np.asarray(pair["dequantized"], np.float64) - np.asarray(pair["float"], np.float64)
            total += float(np.mean(err ** 2)) / out_var if out_var > 0 else 0.0
        else:
            total += float(10 ** (-weights[name] / 10))
    return total


def _node_layers(graph, matches: dict, weights: dict, ranges: dict, kernels: dict[str, np.ndarray],
                 pairs: dict | None = None) -> list[dict]:
    """One row per quantized node, in graph order. Its own error: its constant inputs' quantization
    noise (`_constant_noise`) plus its output's rounding and clipping (the activation before and
    after its QuantizeLinear / DequantizeLinear pair), as noise / signal; beside it the error
    accumulated from the input (the float model's activation against the QDQ model's). `pairs`:
    qdq_loss_debug's weight matching (float and dequantized values by name)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    kernels = _by_values(kernels)
    rows, claimed = [], set()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not node.output:
            continue
        out, fused = node.output[0], False
        if node.op_type in WEIGHTED:   # its quantized output is after a fused activation
            while out not in matches["validation"] and len(consumers.get(out, [])) == 1 \
                    and consumers[out][0].op_type in ACTIVATIONS:
                out, fused = consumers[out][0].output[0], True
        if out in claimed or out not in matches["validation"] or not matches["validation"][out].get("float"):
            continue
        claimed.add(out)
        w = [weights[i] for i in node.input if i in weights]
        row = {"depth": len(rows), "op": node.op_type, "node": node.name, "tensor": out,
               "layer": _layer_name(node, inits, kernels, node.name), "weight_sqnr_db": float(min(w)) if w else None}
        scale, lo, hi = ranges.get(out, (None, None, None))
        for which, match in matches.items():
            m = match[out]
            pre = m["pre_qdq"]
            if fused and scale:   # the quantizer dropped the activation: its range clips in its place
                pre = [np.clip(a, lo, hi) for a in pre]
            act_nsr, _ = _nsr(pre, m["post_qdq"])
            acc_nsr, rmse = _nsr(m["float"], m["post_qdq"])
            f = np.concatenate([np.asarray(a, np.float64).ravel() for a in m["float"]])
            w_nsr = _constant_noise(node, pairs, weights, float(np.var(f)))
            clipped = float(np.mean((f < lo - scale / 2) | (f > hi + scale / 2))) if scale else None
            row[which] = {"rmse_over_scale": rmse / scale if scale else None, "noise_over_signal": w_nsr + act_nsr,
                          "accumulated_noise_over_signal": acc_nsr, "range_used": [lo, hi],
                          "range_seen": [float(f.min()), float(f.max())], "clipped": clipped}
        rows.append(row)
    return rows
