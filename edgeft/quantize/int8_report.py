"""Where an int8 file's error comes from: each quantized op's own error against the float model,
on calibration and validation inputs, and the few ops that account for most of the output error.

TFLite (`tflite_layers`): the float model calibrated as the shipped file was calibrated (the same
converter settings, calibration images, granularity; edgeft.export.keras2tflite.calibrated_model,
shared with the mixed candidates of recovery), then quantized as TensorFlow's
`tf.lite.experimental.QuantizationDebugger` quantizes it (its MLIR quantizer call, through
keras2tflite.quantize_calibrated, without the debugger object, which would calibrate again) into the instrumented model: every quantized op keeps a float twin fed with the
same dequantized inputs, joined by a NumericVerify op. An op's error is therefore its own, not
accumulated from the ops before it. We read both sides of each NumericVerify op (the debugger's
default statistics are means of per-image numbers; ranges need the extremes over all images) and
derive, per op and per input set:

- rmse / scale: the error in quantization steps (uniform rounding alone: 0.29);
- noise / signal: the error's power over the float output's variance (what the op adds to the
  output's relative error; summed over a chain of ops it approximates the output's);
- the range the quantization covers against the range the float output took, and the share of
  values clipped.

Ops are ranked by their share of the summed noise / signal on the validation inputs; the top ones
(up to CONFIRM, until they reach CONFIRM_SHARE) are confirmed by re-quantizing with that one op kept
in float (the quantizer's `denylisted_nodes`, as the debugger sets it) and measuring how much of the output error (RMSE of
the probabilities against the float Keras model, validation inputs) goes away.

ONNX (edgeft.quantize.onnx_report) goes through onnxruntime.quantization.qdq_loss_debug. Writing the
report (markdown, JSON, a PNG by layer depth): `write_int8_report`.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

REPORT_INPUTS = 64      # calibration and validation images each (the instrumented model is slow)
CONFIRM = 3             # at most this many top ops re-quantized with that op kept in float
CONFIRM_SHARE = 0.8     # ... or fewer, once they hold this share of the summed noise / signal
NAMED_REMOVED = 0.1     # a confirmed op is named as a source (and kept float by recovery) when that removes this much
REPORT_NAME = "int8_report"
_NUMERIC_VERIFY = "NumericVerify"


class _Acc:
    """Running sums for one op on one input set."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int):
        self.scale, self.zp = float(scale), int(zero_point)
        self.lo, self.hi = (qmin - self.zp) * self.scale, (qmax - self.zp) * self.scale
        self.n = 0
        self.sq = self.s = self.s2 = 0.0
        self.min, self.max = np.inf, -np.inf
        self.clipped = 0

    def add(self, f: np.ndarray, q: np.ndarray) -> None:
        f = np.asarray(f, np.float64).ravel()
        deq = (np.asarray(q, np.int64).ravel() - self.zp) * self.scale
        d = deq - f
        self.n += f.size
        self.sq += float(d @ d)
        self.s += float(f.sum())
        self.s2 += float(f @ f)
        self.min, self.max = min(self.min, float(f.min())), max(self.max, float(f.max()))
        half = self.scale / 2
        self.clipped += int(np.sum((f < self.lo - half) | (f > self.hi + half)))

    def stats(self) -> dict:
        mse = self.sq / max(self.n, 1)
        var = max(self.s2 / max(self.n, 1) - (self.s / max(self.n, 1)) ** 2, 0.0)
        return {"rmse_over_scale": float(np.sqrt(mse) / self.scale) if self.scale else None,
                "noise_over_signal": float(mse / var) if var > 0 else (0.0 if mse == 0 else float("inf")),
                "range_used": [self.lo, self.hi], "range_seen": [self.min, self.max],
                "clipped": self.clipped / max(self.n, 1)}


def keras_layer_names(model) -> set[str]:
    """Every layer name in the model, nested models included."""
    names, todo = set(), list(model.layers)
    while todo:
        layer = todo.pop()
        names.add(layer.name)
        todo += list(getattr(layer, "layers", []) or [])
    return names


def keras_kernels(model) -> dict[str, np.ndarray]:
    """Layer name -> its kernel (first weight, 2-D or more), nested models included."""
    out, todo = {}, list(model.layers)
    while todo:
        layer = todo.pop()
        todo += list(getattr(layer, "layers", []) or [])
        w = layer.get_weights() if not getattr(layer, "layers", None) else []
        if w and np.ndim(w[0]) >= 2:
            out[layer.name] = np.asarray(w[0])
    return out


def layer_of(tensor_name: str, names: set[str]) -> str:
    """The Keras layer a TFLite / ONNX tensor comes from (its name's last part that is a layer name)."""
    parts = [p for p in re.split(r"[;/:]", tensor_name) if p]
    for part in reversed(parts):
        base = re.sub(r"\d+$", "", part) if part not in names else part
        if part in names:
            return part
        if base in names:
            return base
    if "StatefulPartitionedCall" in tensor_name:
        return "(model output)"
    return parts[0] if parts else tensor_name


def _calibrated_name(numeric_verify_name: str) -> str:
    """The op's output tensor in the calibrated model (what `denylisted_nodes` takes), from its
    NumericVerify output `NumericVerify/{tensor}{digit}:{index}` (the debugger's own rule)."""
    name = numeric_verify_name.rsplit(":", 1)[0][len(_NUMERIC_VERIFY) + 1:]
    return name[:-1] if name and name[-1].isdigit() else name


def _output_error(data: bytes, x: np.ndarray, float_probs: np.ndarray) -> dict:
    """A float-I/O quantized model against the float Keras model's probabilities."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [1, *x.shape[1:]])
    interp.allocate_tensors()
    probs = []
    for img in x:
        interp.set_tensor(inp["index"], img[None].astype(np.float32))
        interp.invoke()
        probs.append(np.asarray(interp.get_tensor(out["index"]), np.float64)[0])
    probs = np.stack(probs)
    return {"prob_rmse": float(np.sqrt(np.mean((probs - float_probs) ** 2))),
            "top1_agreement": float(np.mean(probs.argmax(-1) == float_probs.argmax(-1)))}


def tflite_layers(model, rep_images: np.ndarray, val_images: np.ndarray, io: str = "uint8",
                  granularity: str = "per-channel", float_probs: np.ndarray | None = None,
                  confirm: int = CONFIRM, n_inputs: int = REPORT_INPUTS) -> dict:
    """The per-op report of `model`'s int8 TFLite post-training quantization (as edgeft.export.
    keras2tflite.tflite_int8 makes it: `rep_images` calibrate it all), measured on the first
    `n_inputs` calibration and validation images."""
    from edgeft._keras import tf
    from edgeft.core.progress import Progress, step
    from edgeft.export.keras2tflite import calibrated_model, quantize_calibrated
    from edgeft.quantize.int8_choice import keras_probs

    cal = np.asarray(rep_images[:n_inputs], np.float32)
    val = np.asarray(val_images[:n_inputs], np.float32)
    with step("export", "int8 report: calibrating", key="int8 report calibrate"):
        calibrated = calibrated_model(model, rep_images, io, granularity, label="int8 report")

    def quantize(debug: bool = False, keep=()) -> bytes:   # as the QuantizationDebugger quantizes: float I/O
        return quantize_calibrated(calibrated, None, granularity, keep, numeric_verify=debug)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=quantize(debug=True), experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    ops = interp._get_ops_details()   # noqa: SLF001 - as the debugger itself reads them
    producer = {t: op for op in ops for t in op["outputs"]}
    verify = [op for op in ops if op["op_name"] == _NUMERIC_VERIFY]
    names = keras_layer_names(model)
    layers = []
    for depth, op in enumerate(verify):
        q_idx, f_idx = int(op["inputs"][0]), int(op["inputs"][1])
        qd = interp._get_tensor_details(q_idx, 0)   # noqa: SLF001
        out_name = interp._get_tensor_details(int(op["outputs"][0]), 0)["name"]   # noqa: SLF001
        info = np.iinfo(qd["dtype"])
        params = qd["quantization_parameters"]
        node = _calibrated_name(out_name)
        layers.append({"depth": depth, "op": producer[q_idx]["op_name"] if q_idx in producer else "?",
                       "tensor": node, "layer": layer_of(node, names), "q": q_idx, "f": f_idx,
                       "acc": {s: _Acc(params["scales"][0], params["zero_points"][0], info.min, info.max)
                               for s in ("calibration", "validation")}})
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], [1, *cal.shape[1:]])
    interp.allocate_tensors()
    for which, x in (("calibration", cal), ("validation", val)):
        with Progress(f"int8 report: each op on {which} images", len(x)) as bar:
            for img in x:
                interp.set_tensor(inp["index"], img[None])
                interp.invoke()
                for layer in layers:
                    layer["acc"][which].add(interp.get_tensor(layer["f"]), interp.get_tensor(layer["q"]))
                bar.update()
    for layer in layers:
        acc = layer.pop("acc")
        layer.pop("q"), layer.pop("f")
        layer.update({which: a.stats() for which, a in acc.items()})
    _shares(layers)
    if float_probs is None:
        float_probs = keras_probs(model, val)
    float_probs = np.asarray(float_probs[:len(val)], np.float64)
    with step("export", "int8 report: the top ops kept in float, one at a time", key="int8 report confirm"):
        base = _output_error(quantize(), val, float_probs)
        confirmed = []
        for layer in _candidates(layers, confirm):
            err = _output_error(quantize(keep=[layer["tensor"]]), val, float_probs)
            confirmed.append(_confirmation(layer, err, base))
    return {"tool": f"the QuantizationDebugger's NumericVerify model, by TensorFlow's MLIR quantizer (TensorFlow {tf.__version__})",
            "granularity": granularity, "io": io,
            "inputs": {"calibration": int(len(cal)), "validation": int(len(val))},
            "output_error": base, "layers": layers, "top": _ranked(confirmed)}


def _shares(layers: list[dict]) -> None:
    """Each op's share of the summed noise / signal on the validation inputs (the ranking)."""
    nsr = np.array([min(layer["validation"]["noise_over_signal"], 1e6) for layer in layers], np.float64)
    total = float(nsr.sum())
    for layer, v in zip(layers, nsr):
        layer["share"] = float(v / total) if total > 0 else 0.0


def _candidates(layers: list[dict], confirm: int) -> list[dict]:
    out, cum = [], 0.0
    for layer in sorted(layers, key=lambda r: -r["share"]):
        if len(out) >= confirm or cum >= CONFIRM_SHARE:
            break
        out.append(layer)
        cum += layer["share"]
    return out


def _confirmation(layer: dict, err: dict, base: dict) -> dict:
    b = base["prob_rmse"] ** 2
    removed = 1.0 - err["prob_rmse"] ** 2 / b if b > 0 else 0.0
    return {"layer": layer["layer"], "tensor": layer["tensor"], "op": layer["op"], "depth": layer["depth"],
            "share": layer["share"], "kept_float": err, "output_error_removed": float(removed),
            **({"node": layer["node"]} if "node" in layer else {})}   # ONNX: what nodes_to_exclude takes


def sources(top: list[dict]) -> list[dict]:
    """The confirmed ops named as where the error comes from: keeping one float removes at least
    NAMED_REMOVED of the output error (ranked as `top` is)."""
    return [t for t in top if (t.get("output_error_removed") or 0.0) >= NAMED_REMOVED]


def _ranked(confirmed: list[dict]) -> list[dict]:
    """Confirmed ops by the output error they remove (screening share breaks ties)."""
    return sorted(confirmed, key=lambda c: (-c["output_error_removed"], -c["share"]))


# ---------------------------------------------------------------- the report files
def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def report_markdown(reports: list[dict]) -> str:
    lines = ["# Where the int8 error comes from", "",
             "Each quantized op's own error against the float model (its float twin fed the same dequantized "
             "inputs, so nothing is accumulated from the ops before it), on calibration and validation images. "
             "rmse/scale: the error in quantization steps (rounding alone gives 0.29); noise/signal: the error's "
             "power over the float output's variance; share: of the summed noise/signal on validation images. "
             "The top ops are confirmed by quantizing again with that one op kept in float: how much of the "
             "output error (RMSE of the probabilities against the float Keras model) goes away. Plot: "
             f"{REPORT_NAME}.png. Tools and why: docs/quantization.md."]
    for r in reports:
        out = r["output_error"]
        lines += ["", f"## {r['file']} ({r['runtime']})", "",
                  f"{r['tool']}; {r['granularity']} weights; {r['inputs']['calibration']} calibration and "
                  f"{r['inputs']['validation']} validation images. {r.get('why', '')}".rstrip(), "",
                  f"Output error of the quantized model against float: probability RMSE {_fmt(out['prob_rmse'])}"
                  + (f", top-1 agreement {out['top1_agreement']:.1%}" if out.get("top1_agreement") is not None else "")
                  + "."]
        if r.get("note"):
            lines += ["", r["note"]]
        if r["top"]:
            named = sources(r["top"])
            names = ", ".join(f"**{t['layer']}**" for t in named)
            most = max((t.get("output_error_removed") or 0.0) for t in r["top"])
            lines += ["", f"Most of the output error comes from: {names}." if named else
                      f"No op screened accounts for the output error: kept float one at a time, the top "
                      f"{len(r['top'])} by own error removed at most {most:.1%} of it (the error is spread over "
                      f"many ops, or accumulates along the graph).", "",
                      "| rank | layer | op | depth | share of noise/signal | output error removed when kept float |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {i} | {t['layer']} | {t['op']} | {t['depth']} | {t['share']:.1%} | "
                      f"{_fmt(t.get('output_error_removed'), '.1%')} |" for i, t in enumerate(r["top"], 1)]
        lines += ["", "| depth | layer | op | rmse/scale cal | rmse/scale val | noise/signal val | share | "
                      "range used | range seen (val) | clipped (val) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for layer in r["layers"]:
            c, v = layer["calibration"], layer["validation"]
            lines.append(f"| {layer['depth']} | {layer['layer']} | {layer['op']} | {_fmt(c['rmse_over_scale'])} | "
                         f"{_fmt(v['rmse_over_scale'])} | {_fmt(v['noise_over_signal'])} | {layer['share']:.1%} | "
                         f"[{_fmt(v['range_used'][0])}, {_fmt(v['range_used'][1])}] | "
                         f"[{_fmt(v['range_seen'][0])}, {_fmt(v['range_seen'][1])}] | {_fmt(v['clipped'], '.2%')} |")
    return "\n".join(lines) + "\n"


def plot_report(reports: list[dict], path: Path) -> None:
    """noise / signal by layer depth, calibration and validation, the top ops named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 1, figsize=(10, 3.6 * len(reports)), squeeze=False)
    for ax, r in zip(axes[:, 0], reports):
        depth = [layer["depth"] for layer in r["layers"]]
        for which, style in (("calibration", "o-"), ("validation", "s--")):
            ax.plot(depth, [max(layer[which]["noise_over_signal"], 1e-12) for layer in r["layers"]], style,
                    ms=3, lw=1, label=which)
        ax.set_yscale("log")
        top = max((max(layer[w]["noise_over_signal"], 1e-12) for layer in r["layers"]
                   for w in ("calibration", "validation")), default=1.0)
        ax.set_ylim(top=top * 4)   # room for the names
        ax.set_xlabel("layer depth (quantized ops in execution order)")
        ax.set_ylabel("noise / signal")
        ax.set_title(f"{r['file']} ({r['runtime']}, {r['granularity']})", fontsize=10)
        for t in r["top"]:
            y = max(r["layers"][t["depth"]]["validation"]["noise_over_signal"], 1e-12)
            ax.annotate(t["layer"], (t["depth"], y), textcoords="offset points", xytext=(4, 6), fontsize=8,
                        color="crimson")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_int8_report(out_dir: Path, reports: list[dict]) -> Path:
    """out_dir/int8_report.md, .json and .png; returns the markdown file."""
    from edgeft.core import rundir

    out_dir = Path(out_dir)
    rundir.write_json(out_dir / f"{REPORT_NAME}.json", {"files": reports})
    rundir.write_text(out_dir / f"{REPORT_NAME}.md", report_markdown(reports))
    tmp = out_dir / f".{REPORT_NAME}.png.tmp"
    plot_report(reports, tmp)
    tmp.replace(out_dir / f"{REPORT_NAME}.png")
    return out_dir / f"{REPORT_NAME}.md"
