"""Small statistics for judging agreement on a finite number of inputs."""
from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound near 0 and 1, unlike +-2 SE)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def fmt_interval(successes: int, n: int) -> str:
    lo, hi = wilson_interval(successes, n)
    return f"{successes / n:.1%} [{lo:.1%}, {hi:.1%}] of {n}" if n else "- of 0"


# ---------------------------------------------------------------- statistics over source images
# The parity inputs are copies of a few dozen to a few hundred images, not independent samples:
# every interval below resamples whole images (with all their copies), never single inputs.
import numpy as np  # noqa: E402

N_BOOT = 2000


def group_bootstrap(num, den, groups, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """sum(num) / sum(den) and its 95 % percentile interval, resampling the groups (source images)
    with replacement, each with all its inputs. Inputs with den 0 count for nothing (e.g. inputs
    outside the clear set). A resample whose denominator is 0 is dropped."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    g = int(inv.max()) + 1 if len(inv) else 0
    total = float(den.sum())
    if g == 0 or total == 0:
        return float("nan"), float("nan"), float("nan")
    num_g = np.bincount(inv, weights=num, minlength=g)
    den_g = np.bincount(inv, weights=den, minlength=g)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(g, np.full(g, 1.0 / g), size=n_boot).astype(np.float64)
    d = weights @ den_g
    ok = d > 0
    stats = (weights[ok] @ num_g) / d[ok]
    lo, hi = np.percentile(stats, [2.5, 97.5]) if len(stats) else (float("nan"), float("nan"))
    return float(num.sum() / total), float(lo), float(hi)


def paired_difference(a_correct, b_correct, groups, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) of two 0/1 vectors on the same inputs (paired), with its 95 % interval
    by resampling source images."""
    a = np.asarray(a_correct, np.float64)
    b = np.asarray(b_correct, np.float64)
    return group_bootstrap(a - b, np.ones_like(a), groups, n_boot, seed)


def points_per_image(groups) -> float:
    """How many accuracy points one source image carries (with all its copies): the resolution."""
    n = len(np.unique(np.asarray(groups)))
    return 100.0 / n if n else float("inf")
