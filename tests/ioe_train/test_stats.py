"""The seed statistics of `ioe-train compare` against closed forms and published t tables."""

from __future__ import annotations

import math

import pytest

from ioe_train.stats import ci95, mean_sd, t_quantile


def test_t_quantile_matches_closed_forms_and_tables():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)  # Cauchy
        a = 2 * p - 1  # 2 dof: P(|T| <= t) = t / sqrt(2 + t^2)
        assert t_quantile(p, 2) == pytest.approx(a * math.sqrt(2 / (1 - a * a)), rel=1e-12)
    # 0.975 quantiles, 3 to 30 dof and the normal limit (tables to 6 digits)
    for dof, t in ((3, 3.182446), (4, 2.776445), (5, 2.570582), (9, 2.262157), (30, 2.042272), (10**5, 1.959988)):
        assert t_quantile(0.975, dof) == pytest.approx(t, abs=1e-6)


def test_mean_sd_and_interval():
    assert mean_sd([]) == (None, None) and mean_sd([2.0]) == (2.0, None) and ci95([2.0]) is None
    mean, sd = mean_sd([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and sd == pytest.approx(math.sqrt((16 + 1 + 25) / 9 / 2))  # ddof 1
    half = t_quantile(0.975, 2) * sd / math.sqrt(3)
    assert ci95([1.0, 2.0, 4.0]) == (pytest.approx(mean - half), pytest.approx(mean + half))
