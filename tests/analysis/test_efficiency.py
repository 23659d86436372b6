"""Efficiency length: CAB's method gives the closed form on constructed curves (its reproduction of CAB's
published figures is tests/analysis/test_cab_reproduction.py); the robust method's crossing, outcomes and
bootstrap interval."""

import math

import numpy as np
import pytest

from cab.analysis import efficiency_length
from cab.analysis.efficiency_length import ALWAYS, CROSSES, ENDS_DEARER, NEVER, NO_CROSSING


def test_cab_method_closed_form_on_constructed_curves():
    lengths = [256, 512, 1024, 2048, 4096]
    exact = [2e-6 * n ** 2 + 1e-4 * n + 0.5 for n in lengths]
    efficient = [2.1e-3 * n + 0.5 for n in lengths]  # 2e-6 n^2 + 1e-4 n = 2.1e-3 n  ->  n = 1000
    for metric in ("time", "memory"):  # exact lines: leaving the shortest length out changes nothing
        found = efficiency_length(lengths, exact, efficient, "cab", metric=metric)
        assert found.outcome == CROSSES and found.length == pytest.approx(1000.0, rel=1e-9)
    never = efficiency_length(lengths, [1.0 + 1e-6 * n ** 2 for n in lengths], [1e-4 * n for n in lengths], "cab",
                              metric="memory")  # cheaper everywhere by the fits: no real root
    assert never.outcome == NO_CROSSING and never.length is None


def test_robust_crossing_of_power_laws_is_exact():
    """exact = c n^2, efficient = c n^2 at n* scaled to n/n*: their log ratio is linear in log n, so the
    piecewise power-law interpolation recovers n* exactly wherever it falls between measured lengths."""
    lengths = [256, 512, 1024, 2048, 4096, 8192]
    for crossing in (300.0, 3000.0, 8000.0):
        exact = [1e-6 * n ** 2 for n in lengths]
        efficient = [1e-6 * crossing * n for n in lengths]
        found = efficiency_length(lengths, exact, efficient)
        assert found.outcome == CROSSES and found.length == pytest.approx(crossing, rel=1e-12)
        assert found.first_cheaper == min(n for n in lengths if n > crossing)


@pytest.mark.parametrize("efficient,outcome,first", [
    ([0.5, 1.0, 2.0, 3.0], ALWAYS, 100),
    ([2.0, 5.0, 9.0, 20.0], NEVER, None),
    ([2.0, 1.0, 3.0, 9.0], ENDS_DEARER, 200),  # cheaper at 200 only
])
def test_robust_outcomes(efficient, outcome, first):
    found = efficiency_length([100, 200, 400, 800], [1.0, 2.0, 4.0, 8.0], efficient)
    assert (found.outcome, found.length, found.first_cheaper) == (outcome, None, first)


def _noisy(values, rng, n=25, spread=0.05):
    return [v * np.exp(rng.normal(0.0, spread, n)) for v in values]


def test_bootstrap_interval_brackets_the_crossing_and_is_reproducible():
    rng = np.random.default_rng(3)
    lengths = [256, 512, 1024, 2048, 4096, 8192]
    exact = _noisy([1e-6 * n ** 2 for n in lengths], rng)
    efficient = _noisy([1e-6 * 1500 * n for n in lengths], rng)
    found = efficiency_length(lengths, exact, efficient, n_boot=400, seed=7)
    assert found.outcome == CROSSES and 1024 < found.low <= found.length <= found.high < 2048
    assert found.low < 1500 < found.high
    assert found.details["bootstrap"]["outcomes"][CROSSES] == 1.0
    assert efficiency_length(lengths, exact, efficient, n_boot=400, seed=7) == found
    medians = [float(np.median(s)) for s in exact]
    assert found.details["exact_medians"] == pytest.approx(medians)


def test_bootstrap_interval_open_below_the_range_when_resamples_are_cheaper_everywhere():
    rng = np.random.default_rng(0)
    lengths = [100, 200, 400]
    exact = _noisy([1.0, 2.0, 4.0], rng, spread=0.3)
    efficient = _noisy([1.02, 1.5, 2.0], rng, spread=0.3)  # about equal at the shortest length
    found = efficiency_length(lengths, exact, efficient, n_boot=300)
    as_dict = found.to_dict()
    assert found.low == -math.inf and as_dict["low"] is None and as_dict["low_side"] == "below_range"
    assert as_dict["high_side"] == "" and as_dict["high"] == found.high
    assert 0 < found.details["bootstrap"]["outcomes"][ALWAYS] < 1


def test_interval_of_a_method_cheaper_everywhere_lies_below_the_range():
    rng = np.random.default_rng(1)
    found = efficiency_length([100, 200, 400], _noisy([1.0, 2.0, 4.0], rng), _noisy([0.1, 0.2, 0.4], rng), n_boot=100)
    assert found.outcome == ALWAYS and found.low == found.high == -math.inf
    assert found.to_dict()["high_side"] == "below_range"


@pytest.mark.parametrize("lengths,exact,efficient,match", [
    ([1, 2], [1.0], [1.0, 2.0], "one exact and one efficient entry"),
    ([2, 1], [1.0, 2.0], [1.0, 2.0], "strictly increasing"),
    ([1, 2], [1.0, float("nan")], [1.0, 2.0], "non-finite"),
    ([1, 2], [1.0, []], [1.0, 2.0], "no samples"),
])
def test_bad_inputs_are_refused(lengths, exact, efficient, match):
    with pytest.raises(ValueError, match=match):
        efficiency_length(lengths, exact, efficient)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of robust, cab"):
        efficiency_length([1, 2], [1, 2], [1, 2], method="fit")
