"""Parity tiers: how close a file's outputs must be to the Keras model's.

Exact (max |Δprob| within atol) for float files, statistical (top-1 agreement and accuracy
drop) for quantized ones, as keras-hub's numerics tests do. Numpy only: used by the gate, by
the int8 choice and by `edgeft qat`.
"""
from __future__ import annotations

import numpy as np

from .config import ParityConfig


def exact_failures(probs, ref, atol: float) -> list[str]:
    diff = float(np.max(np.abs(probs - ref)))
    return [] if diff <= atol else [f"max |Δprob| {diff:.2e} > {atol:.0e}"]


def agreement(probs, ref) -> float:
    return float(np.mean(probs.argmax(-1) == ref.argmax(-1)))


def statistical_failures(probs, ref, y, float_acc: float, min_agreement: float, max_drop: float) -> list[str]:
    out = []
    agree = agreement(probs, ref)
    if agree < min_agreement:
        out.append(f"top-1 agreement {agree:.1%} < {min_agreement:.0%} (of {len(y)} inputs)")
    drop = float_acc - float(np.mean(probs.argmax(-1) == y))
    if drop > max_drop + 1e-9:
        out.append(f"accuracy drop {drop * 100:.1f} points > {max_drop * 100:.1f}")
    return out


def tier_failures(tier: str, probs, ref, y, float_acc: float, p: ParityConfig, from_qat: bool) -> list[str]:
    if tier == "float":
        return exact_failures(probs, ref, p.float_atol)
    if tier == "fp16":
        return exact_failures(probs, ref, p.fp16_atol) + \
            statistical_failures(probs, ref, y, float_acc, p.fp16_agreement, 1.0)
    if tier == "dynamic":
        return exact_failures(probs, ref, p.dynamic_atol) + \
            statistical_failures(probs, ref, y, float_acc, p.dynamic_agreement, 1.0)
    return statistical_failures(probs, ref, y, float_acc, p.int8_agreement,
                                p.int8_qat_max_drop if from_qat else p.int8_max_drop)
