"""The two int8 TFLite files a QAT run can ship, judged side by side by LiteRT.

Post-training quantization of the float model (PTQ) and conversion of the QAT model are both
built, run by LiteRT (the runtime a device uses) on the parity inputs, and the more accurate one
ships; a tie goes to PTQ (no training needed to reproduce it). `edgeft qat` prints the same
comparison, so a user sees whether QAT paid for itself.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .config import ParityConfig
from .convert import tflite_int8
from .runtime import TFLiteRunner
from .stats import wilson_interval
from .tiers import agreement, tier_failures


@dataclass
class Int8Candidate:
    source: str                 # "ptq" or "qat"
    data: bytes
    accuracy: float             # top-1 accuracy by LiteRT on the parity inputs
    agree_float: float          # top-1 agreement with the float Keras model
    agree_source: float | None  # with the QAT Keras model (qat only): fidelity of the conversion
    n: int
    failures: list[str]         # its int8 parity tier (empty: passes)

    def summary(self) -> dict:
        lo, hi = wilson_interval(round(self.accuracy * self.n), self.n)
        return {"source": self.source, "size_bytes": len(self.data), "accuracy": self.accuracy,
                "accuracy_interval": [lo, hi], "agreement_with_float": self.agree_float,
                "agreement_with_source": self.agree_source, "n": self.n, "passes_tier": not self.failures,
                "failures": self.failures}


def tflite_probs(data: bytes, x: np.ndarray) -> np.ndarray:
    """Probabilities from a .tflite file's bytes, run by LiteRT (default kernels)."""
    fd, path = tempfile.mkstemp(suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return TFLiteRunner(path).predict(x)
    finally:
        os.unlink(path)


def keras_probs(model, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model.predict_on_batch(x[i:i + 64]), np.float32)
                           for i in range(0, len(x), 64)])


def candidate(source: str, data: bytes, x: np.ndarray, y: np.ndarray, float_probs: np.ndarray,
              parity: ParityConfig, source_probs: np.ndarray | None = None) -> Int8Candidate:
    """One int8 file judged as the gate will judge it (agreement with its source model)."""
    probs = tflite_probs(data, x)
    float_acc = float(np.mean(float_probs.argmax(-1) == y))
    fails = tier_failures("int8", probs, float_probs if source_probs is None else source_probs, y, float_acc,
                          parity, source_probs is not None)
    return Int8Candidate(source, data, float(np.mean(probs.argmax(-1) == y)), agreement(probs, float_probs),
                         None if source_probs is None else agreement(probs, source_probs), len(y), fails)


def build_candidates(model, qat_model, rep_images: np.ndarray, x: np.ndarray, y: np.ndarray,
                     io: str, granularity: str, parity: ParityConfig) -> list[Int8Candidate]:
    """PTQ always; QAT too when a QAT model is given."""
    float_probs = keras_probs(model, x)
    out = [candidate("ptq", tflite_int8(model, rep_images, io, granularity), x, y, float_probs, parity)]
    if qat_model is not None:
        out.append(candidate("qat", tflite_int8(qat_model, rep_images, io, granularity), x, y, float_probs,
                             parity, keras_probs(qat_model, x)))
    return out


def choose(cands: list[Int8Candidate]) -> Int8Candidate:
    """The most accurate candidate among those that pass their parity tier (all of them when none
    does); a tie goes to PTQ."""
    passing = [c for c in cands if not c.failures] or cands
    return max(passing, key=lambda c: (round(c.accuracy * c.n), c.source == "ptq"))
