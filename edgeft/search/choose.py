"""Which candidates go on, and which one ships: pure functions of validation results.

Nothing here sees the test split: halving ranks by validation accuracy (stage 1, then stage 2),
and the choice is made on the shipped file's validation accuracy (by its runtime), with a
paired test on the same validation images (edgeft.core.stats). Test accuracy is reported beside
it, never read here (tests/test_search.py checks the choice does not move when it changes).
"""
from __future__ import annotations

import math

import numpy as np

from edgeft.core.stats import paired_difference

FASTER = 0.05   # a candidate is faster when its latency is at least 5 % lower (the same otherwise: noise)
SMALLER = 0.05  # ... and, at the same latency, smaller when its file is at least 5 % smaller


def rank(values: dict[str, float]) -> list[str]:
    """Candidates by validation accuracy, best first (ties: by name, so reruns agree)."""
    return sorted(values, key=lambda c: (-values[c], c))


def promoted(values: dict[str, float], keep: float, at_least: int) -> list[str]:
    """The better part that goes on: ceil(keep * n), and never fewer than `at_least` (or all)."""
    order = rank(values)
    n = min(len(order), max(at_least, math.ceil(keep * len(order))))
    return order[:n]


RULE = ("among the finalists whose shipped file passed the parity gate and meets every limit (measured again "
        "after training), the one with the highest validation accuracy of that file (by its runtime); unless a "
        "faster candidate (latency >= 5 % lower; at the same latency, a file >= 5 % smaller) is not worse by a "
        "paired test on the same validation images (95 % interval of the accuracy difference, resampling images, "
        "reaches 0): then the fastest such one. The test split plays no part.")


def _cost(f: dict) -> tuple[float, float]:
    lat = f.get("latency")
    return (math.inf if lat is None else lat, f.get("size_bytes") or math.inf)


def is_cheaper(a: dict, b: dict) -> bool:
    """a is faster than b, or as fast and smaller (FASTER / SMALLER margins)."""
    (la, sa), (lb, sb) = _cost(a), _cost(b)
    if math.isfinite(la) and math.isfinite(lb):
        if la <= lb * (1 - FASTER):
            return True
        if la >= lb * (1 - FASTER) and la <= lb * (1 + FASTER):
            return sa <= sb * (1 - SMALLER)
        return False
    return sa <= sb * (1 - SMALLER)   # no latency to compare (TFLite Micro without device times): smaller


def choose(finalists: list[dict], seed: int = 0) -> dict:
    """finalists: {"id", "val_correct" (0/1 per validation image, the same images in the same order
    for all), "latency", "size_bytes", "eligible", "why_not"}. Returns {"chosen", "most_accurate",
    "comparisons", "rule"}; chosen is None when no finalist is eligible."""
    eligible = [f for f in finalists if f["eligible"]]
    out = {"rule": RULE, "chosen": None, "most_accurate": None, "comparisons": []}
    if not eligible:
        return out
    acc = {f["id"]: float(np.mean(f["val_correct"])) for f in eligible}
    best = sorted(eligible, key=lambda f: (-acc[f["id"]], *_cost(f), f["id"]))[0]
    out["most_accurate"] = out["chosen"] = best["id"]
    cheaper = sorted((f for f in eligible if f is not best and is_cheaper(f, best)), key=lambda f: (*_cost(f), f["id"]))
    groups = np.arange(len(best["val_correct"]))
    for f in cheaper:
        diff, lo, hi = paired_difference(f["val_correct"], best["val_correct"], groups, seed=seed)
        ok = hi >= 0.0
        out["comparisons"].append({"candidate": f["id"], "against": best["id"], "difference": diff, "low": lo,
                                   "high": hi, "not_worse": bool(ok)})
        if ok:
            out["chosen"] = f["id"]
            break
    return out
