"""The floor of int8 arithmetic: one file, two correct implementations, how often they agree.

The same int8 file under LiteRT's optimized kernels (XNNPACK) and its reference kernels, or
under ONNX Runtime with and without its graph fusions (QDQ fused into integer kernels, or run
as dequantize -> float op -> quantize), rounds differently and so disagrees on some near-tie
inputs. No file can be expected to agree with its float or QAT source model more closely than
it agrees with itself: the gate sets the int8 agreement threshold from this floor, measured in
the same run on the same inputs. The second implementation is slow (reference kernels), so it
runs on `floor_inputs` inputs spread over the images, within a time budget, and stops as soon as
the interval of its clear-input agreement is narrower than the gate's floor slack (on at least
MIN_JUDGED clear inputs): more inputs could not move the threshold by a point. The reference
outputs are kept on the Floor (`reference`): TensorFlow Lite Micro is checked against them.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgeft.core.progress import Progress
from edgeft.core.stats import group_bootstrap
from edgeft.core.tiers import MIN_JUDGED, Failure, Floor, clear_mask

BUDGET_S = 120.0    # the second implementation stops after this long (it has run >= MIN_INPUTS)
MIN_INPUTS = 50
CHECK_EVERY = 10    # inputs between two looks at the interval (a bootstrap: milliseconds)


def floor_subset(n: int, k: int, seed: int) -> np.ndarray:
    """k input positions spread over all n, in a seeded order (an early stop keeps the spread)."""
    k = min(n, k)
    if k <= 0:
        return np.zeros(0, np.int64)
    return np.random.default_rng(seed + 11).permutation(n)[:k]


class _RefTFLite:
    how = "LiteRT reference kernels"

    def __init__(self, path: Path):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.interp = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
        detail = self.interp.get_input_details()[0]
        if detail["shape"][0] != 1:
            self.interp.resize_tensor_input(detail["index"], [1, *detail["shape"][1:]])
        self.interp.allocate_tensors()
        self.i, self.o = self.interp.get_input_details()[0], self.interp.get_output_details()[0]

    def predict_one(self, img: np.ndarray) -> np.ndarray:
        from edgeft.device import dequantize, quantize

        self.interp.set_tensor(self.i["index"], quantize(img[None], self.i["dtype"], *self.i["quantization"]))
        self.interp.invoke()
        return dequantize(self.interp.get_tensor(self.o["index"]), *self.o["quantization"])[0]


class _RefOnnx:
    how = "ONNX Runtime without graph fusions (QDQ as dequantize -> float op -> quantize)"

    def __init__(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def predict_one(self, img: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.name: np.asarray(img[None], np.float32)})[0])[0]


def second_implementation(path: Path):
    return _RefOnnx(path) if Path(path).suffix.lower() == ".onnx" else _RefTFLite(path)


def measure_floor(path: Path, x: np.ndarray, probs: np.ndarray, source_probs: np.ndarray, groups: np.ndarray,
                  clear_margin: float, k: int, seed: int, budget_s: float = BUDGET_S,
                  label: str | None = None, slack: float | None = None) -> Floor | None:
    """The file's agreement with itself under its second implementation (None when k is 0).

    `slack` (points, the gate's floor slack): stop once the clear-input agreement's 95 % interval
    is narrower than it. The Floor's `reference` holds (input positions, the second
    implementation's outputs) for those who check a third implementation against it."""
    idx = floor_subset(len(x), k, seed)
    if not len(idx):
        return None
    ref = second_implementation(path)
    out, start = [], time.perf_counter()
    with Progress(label or f"floor: {Path(path).name}", len(idx), "inputs") as bar:
        for i in idx:
            out.append(np.asarray(ref.predict_one(x[i]), np.float32))
            bar.update()
            if len(out) >= MIN_INPUTS and time.perf_counter() - start > budget_s:
                break
            if (slack is not None and len(out) >= MIN_INPUTS and len(out) % CHECK_EVERY == 0
                    and settled(idx[:len(out)], out, probs, source_probs, groups, clear_margin, slack, seed)):
                break
    used = idx[:len(out)]
    clear = clear_mask(source_probs[used], clear_margin)
    floor = Floor.measure(ref.how, probs[used], np.stack(out), groups[used], clear, seed, source_probs[used])
    floor.reference = (used, np.stack(out))   # not a field: parity.json does not carry the outputs
    return floor


def settled(used, out, probs, source_probs, groups, clear_margin: float, slack: float, seed: int) -> bool:
    """The clear-input agreement so far has an interval narrower than `slack` points, on at least
    MIN_JUDGED clear inputs: the threshold it sets cannot move by the slack any more."""
    clear = clear_mask(source_probs[used], clear_margin)
    if clear.sum() < MIN_JUDGED:
        return False
    same = (probs[used].argmax(-1) == np.stack(out).argmax(-1)).astype(np.float64)
    _, lo, hi = group_bootstrap(same * clear, clear.astype(np.float64), groups[used], seed=seed)
    return hi - lo < slack / 100.0


# ---------------------------------------------------------------- the input contract
# edgeft's int8 TFLite files take camera pixels as they are: uint8 with scale 1 / zero point 0
# (or int8 with scale 1 / zero point -128, --int8-io int8). A runner that honours the file's own
# scale hides a wrong one (it quantizes accordingly); a camera app feeding raw pixels does not.
CONTRACT = {"uint8": (1.0, 0), "int8": (1.0, -128)}


def input_contract_failures(path: Path) -> list[Failure]:
    """An integer-input .tflite file whose input quantization is not the raw-pixel contract."""
    if Path(path).suffix.lower() != ".tflite":
        return []
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(path)).get_input_details()[0]
    kind = np.dtype(detail["dtype"]).name
    if kind not in CONTRACT:
        return []
    scale, zero_point = detail["quantization"]
    want = CONTRACT[kind]
    if abs(scale - want[0]) > 1e-6 or int(zero_point) != want[1]:
        return [Failure("input_contract", f"{kind} input quantization scale {scale:g} / zero point {zero_point}: the "
                        f"contract is raw pixels, scale {want[0]:g} / zero point {want[1]} (a camera app feeding "
                        "pixels as they are would be wrong)")]
    return []
