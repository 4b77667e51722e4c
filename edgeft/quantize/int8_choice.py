"""The two int8 TFLite files a QAT run can ship, judged side by side by LiteRT.

Post-training quantization of the float model (PTQ) and conversion of the QAT model are both
built, run by LiteRT (the runtime a device uses) on the parity inputs and judged by the gate's
own decision (edgeft.core.tiers.judge against each file's source model, with the floor measured on
that file). Among those that pass, QAT ships only when it is **clearly** more accurate than PTQ:
its paired accuracy gain over PTQ on the same inputs has a 95 % interval (over source images)
above 0. Otherwise PTQ ships (no training needed to reproduce it). `edgeft qat` prints the same
comparison and the same decision.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from edgeft.core.config import ParityConfig
from edgeft.core.floor import input_contract_failures, measure_floor
from edgeft.core.formats import INT8_RULE
from edgeft.core.progress import step
from edgeft.core.stats import group_bootstrap, paired_difference
from edgeft.core.tiers import Floor, Judgement, agreement, describe, judge
from edgeft.export.keras2tflite import tflite_int8
from edgeft.nn.runtime import TFLiteRunner


@dataclass
class Int8Candidate:
    source: str                 # "ptq" or "qat"
    data: bytes
    probs: np.ndarray           # by LiteRT on the parity inputs
    accuracy: float
    agree_float: float          # top-1 agreement with the float Keras model
    agree_source: float | None  # with the QAT Keras model (qat only): fidelity of the conversion
    n: int
    judgement: Judgement        # the gate's decision against its source model
    correct: np.ndarray         # 0/1 per input: the file's top-1 is the label
    groups: np.ndarray          # each input's source image (what intervals resample)
    floor: Floor | None = None  # with its reference outputs (the gate checks TensorFlow Lite Micro against them)

    @property
    def failures(self) -> list[str]:
        return self.judgement.failures

    def summary(self) -> dict:
        j = self.judgement
        _, lo, hi = group_bootstrap(self.correct, np.ones(self.n), self.groups)
        return {"source": self.source, "size_bytes": len(self.data), "accuracy": self.accuracy,
                "accuracy_interval": [lo, hi], "agreement_with_float": self.agree_float,
                "agreement_with_source": self.agree_source, "n": self.n, "passes_tier": not self.failures,
                "failures": self.failures, "accuracy_drop_points": j.accuracy_drop_points,
                "accuracy_drop_interval": j.accuracy_drop_interval, "clear_agreement": j.clear_agreement,
                "required_clear_agreement": j.required_clear_agreement, "floor": j.floor}


def tflite_probs(data: bytes, x: np.ndarray) -> np.ndarray:
    """Probabilities from a .tflite file's bytes, run by LiteRT (default kernels)."""
    with _tmp_tflite(data) as path:
        return TFLiteRunner(path).predict(x)


class _tmp_tflite:
    def __init__(self, data: bytes):
        self.data = data

    def __enter__(self) -> str:
        fd, self.path = tempfile.mkstemp(suffix=".tflite")
        with os.fdopen(fd, "wb") as f:
            f.write(self.data)
        return self.path

    def __exit__(self, *exc):
        os.unlink(self.path)


def keras_probs(model, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model.predict_on_batch(x[i:i + 64]), np.float32)
                           for i in range(0, len(x), 64)])


def candidate(source: str, data: bytes, inputs, float_probs: np.ndarray, parity: ParityConfig, seed: int,
              source_probs: np.ndarray | None = None) -> Int8Candidate:
    """One int8 file judged as the gate will judge it (against its source model, its own floor)."""
    x, y, groups = inputs.x, inputs.y, inputs.source
    src = float_probs if source_probs is None else source_probs
    with _tmp_tflite(data) as path:
        with step("export", f"int8 {source}: LiteRT on {len(x)} parity inputs", key=f"litert tflite_int8 {source}"):
            probs = TFLiteRunner(path).predict(x)
        with step("export", f"int8 {source}: the floor (LiteRT reference kernels)", key=f"floor tflite_int8 {source}"):
            floor = measure_floor(path, x, probs, src, groups, parity.clear_margin, parity.floor_inputs, seed,
                                  label=f"floor: model_int8.tflite ({source})", slack=parity.floor_slack)
        contract = input_contract_failures(path)
    j = judge("int8", probs, src, y, groups, parity, floor, seed)
    j.failures[:0] = contract
    j.verdict = describe(j)
    return Int8Candidate(source, data, probs, float(np.mean(probs.argmax(-1) == y)), agreement(probs, float_probs),
                         None if source_probs is None else agreement(probs, source_probs), len(y), j,
                         (probs.argmax(-1) == y).astype(np.float64), np.asarray(groups), floor)


def build_candidates(model, qat_model, rep_images: np.ndarray, inputs, io: str, granularity: str,
                     parity: ParityConfig, seed: int = 0, float_probs=None, qat_probs=None) -> list[Int8Candidate]:
    """PTQ always; QAT too when a QAT model is given. `float_probs` / `qat_probs`: the Keras models'
    outputs on the inputs when the caller has them already (export computes them once for the gate too)."""
    if float_probs is None:
        with step("export", f"Keras on {len(inputs.x)} parity inputs", key="keras on parity inputs"):
            float_probs = keras_probs(model, inputs.x)
    with step("export", "converting model_int8.tflite (ptq)", key="convert tflite_int8 ptq"):
        ptq = tflite_int8(model, rep_images, io, granularity)
    out = [candidate("ptq", ptq, inputs, float_probs, parity, seed)]
    if qat_model is not None:
        with step("export", "converting model_int8.tflite (qat)", key="convert tflite_int8 qat"):
            qat = tflite_int8(qat_model, rep_images, io, granularity)
        if qat_probs is None:
            with step("export", f"Keras QAT on {len(inputs.x)} parity inputs", key="keras qat on parity inputs"):
                qat_probs = keras_probs(qat_model, inputs.x)
        out.append(candidate("qat", qat, inputs, float_probs, parity, seed, qat_probs))
    return out


def qat_gain(cands: list[Int8Candidate], groups) -> tuple[float, float, float] | None:
    """QAT's int8 file minus PTQ's, accuracy in points, paired over the same inputs, 95 % interval."""
    by = {c.source: c for c in cands}
    if "qat" not in by:
        return None
    d, lo, hi = paired_difference(by["qat"].correct, by["ptq"].correct, groups)
    return d * 100, lo * 100, hi * 100


def choose(cands: list[Int8Candidate]) -> Int8Candidate:
    """PTQ, unless QAT passes the gate and is clearly more accurate (paired interval above 0);
    among failing candidates only (none passes), the one with the smaller accuracy drop."""
    passing = [c for c in cands if not c.failures]
    if not passing:
        return min(cands, key=lambda c: (c.judgement.accuracy_drop_points, c.source != "ptq"))
    by = {c.source: c for c in passing}
    if "qat" in by and "ptq" in by:
        gain = qat_gain(cands, by["ptq"].groups)
        return by["qat"] if gain is not None and gain[1] > 0 else by["ptq"]
    return passing[0]


RULE = INT8_RULE


def why_shipped(cands: list[Int8Candidate], chosen: Int8Candidate) -> str:
    """Why `chosen` ships, in this run's numbers (the rule: `choose`)."""
    by = {c.source: c for c in cands}
    if "qat" not in by:
        return "only post-training quantization (no QAT model)"
    gain = qat_gain(cands, by["ptq"].groups)
    d, lo, hi = gain
    measured = f"QAT's int8 file is {d:+.1f} points [95 % {lo:+.1f}, {hi:+.1f}] against PTQ's on the same inputs"
    failing = [c.source.upper() for c in cands if c.failures]
    if len(failing) == len(cands):
        return f"neither passes the gate: the one with the smaller accuracy drop ships; {measured}"
    if failing:
        return f"{failing[0]}'s int8 file fails the gate ({'; '.join(by[failing[0].lower()].failures)}); {measured}"
    if chosen.source == "qat":
        return f"{measured}: clearly better (interval above 0)"
    return f"{measured}: not clearly better (the interval reaches 0 or below), so PTQ, which needs no training"
