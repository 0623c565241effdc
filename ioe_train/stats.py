"""Seed statistics for `ioe-train compare`: mean ± sample sd, and a paired difference's Student-t
interval (n - 1 degrees of freedom).

The t quantile inverts the closed-form CDF of Student's t with an integer number of degrees of
freedom (Abramowitz & Stegun 26.7.3-4), which is exact: no scipy for one function.
"""

from __future__ import annotations

import math


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample sd with ddof 1); None where there are too few values (0 for the mean, 1 for sd)."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t_central(t: float, dof: int) -> float:
    """P(|T| <= t) for Student's t with `dof` >= 1 degrees of freedom, t >= 0 (A&S 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2 = math.cos(theta) ** 2
    odd = dof % 2 == 1
    # A series in cos^2(theta) of (dof - 1) // 2 terms (odd dof: 1, 2/3, 2*4/(3*5), ...) or dof // 2
    # terms (even dof: 1, 1/2, 1*3/(2*4), ...).
    term = total = 1.0
    for k in range(1, (dof - 1) // 2 if odd else dof // 2):
        term *= c2 * ((2 * k) / (2 * k + 1) if odd else (2 * k - 1) / (2 * k))
        total += term
    if not odd:
        return math.sin(theta) * total
    return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if dof > 1 else 0.0))


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (p in [0.5, 1)) of Student's t with `dof` degrees of freedom, by bisection."""
    target = 2 * p - 1  # P(|T| <= t) at the p-quantile
    lo, hi = 0.0, 1.0
    while t_central(hi, dof) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):  # adjacent floats: as close as double precision gets
            break
        lo, hi = (mid, hi) if t_central(mid, dof) < target else (lo, mid)
    return (lo + hi) / 2


def ci95(values: list[float]) -> tuple[float, float] | None:
    """The 95% Student-t interval of the mean of `values` (None below 2 values)."""
    mean, sd = mean_sd(values)
    if mean is None or sd is None:
        return None
    half = t_quantile(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return mean - half, mean + half
