"""The report's arithmetic: relative improvement and the paired bootstrap interval of hhh differences."""

from __future__ import annotations

import numpy as np

from h3fusion.report import hhh_difference_interval, relative_improvement


def test_relative_improvement_follows_the_metric_direction():
    assert relative_improvement(0.6, 0.5, higher_is_better=True) == (0.6 - 0.5) / 0.5
    assert relative_improvement(0.1, 0.4, higher_is_better=False) == (0.4 - 0.1) / 0.4  # fewer flagged: better
    assert relative_improvement(0.5, 0.6, higher_is_better=True) < 0
    assert relative_improvement(0.5, 0.0, higher_is_better=True) is None  # undefined, not infinite


def values(rng, win, flagged, ti, n=200):
    return {"helpful": rng.uniform(0, 2 * win, n), "harmless": (rng.uniform(size=n) < flagged).astype(float),
            "honest": (rng.uniform(size=n) < ti).astype(float)}


def test_bootstrap_interval_separates_real_gaps_from_noise():
    rng = np.random.default_rng(1)
    a = values(rng, 0.3, 0.5, 0.2)
    low, high = hhh_difference_interval(a, a)
    assert low == high == 0.0  # a system against itself
    better = {**a, "harmless": np.zeros_like(a["harmless"])}  # never flagged: hhh up by mean(flagged)/3
    low, high = hhh_difference_interval(better, a)
    gap = a["harmless"].mean() / 3
    assert 0 < low < gap < high
    noisy = values(np.random.default_rng(2), 0.3, 0.5, 0.2)  # same rates, different draws
    low, high = hhh_difference_interval(noisy, a)
    assert low < 0 < high
