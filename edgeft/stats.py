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
