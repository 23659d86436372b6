"""Efficiency length: CAB's method reproduces CAB's published figures from CAB's raw curves and the closed
form on constructed curves; the robust method's crossing, outcomes and bootstrap interval."""

import math

import numpy as np
import pytest

from cab.analysis import efficiency_length
from cab.analysis.efficiency_length import ALWAYS, CROSSES, ENDS_DEARER, NEVER, NO_CROSSING

# CAB's raw curves: Shark-NLP/CAB, scripts/efficiency_length/cost.xlsx (sheets "time" in ms and "memory" in
# MB; forward, noncausal self, batch 4, width 512, 8 heads). The repository ships vanilla's and ABC's; CAB's
# README reports ABC's efficiency length as 1,877 (time) and 70 (memory).
CAB_LENGTHS = [256, 512, 1024, 2048, 4096, 8192]
CAB_TIME = {"vanilla": [0.472, 0.628, 0.721, 0.981, 3.67, 18.437], "abc": [0.648, 0.59, 0.602, 0.91, 1.006, 1.509]}
CAB_MEMORY = {"vanilla": [81, 265, 952, 3604, 14020, 55300], "abc": [42, 80, 156, 308, 612, 1220]}


def _cab_formula(lengths, exact, efficient, skip):
    """CAB's script written out: normal equations of both fits, then the '+' root of the quadratic formula."""
    n = np.asarray(lengths, dtype=float)
    design = np.stack([n ** 2, n, np.ones_like(n)], axis=1)
    a, b, c = np.linalg.lstsq(design, np.asarray(exact, dtype=float), rcond=None)[0]
    line = np.stack([n[skip:], np.ones_like(n[skip:])], axis=1)
    d, e = np.linalg.lstsq(line, np.asarray(efficient, dtype=float)[skip:], rcond=None)[0]
    return (-(b - d) + math.sqrt((b - d) ** 2 - 4 * a * (c - e))) / (2 * a)


def test_cab_method_reproduces_cabs_published_abc_figures():
    time = efficiency_length(CAB_LENGTHS, CAB_TIME["vanilla"], CAB_TIME["abc"], "cab", skip_shortest=True)
    memory = efficiency_length(CAB_LENGTHS, CAB_MEMORY["vanilla"], CAB_MEMORY["abc"], "cab")
    assert (time.outcome, round(time.length)) == (CROSSES, 1877)
    assert (memory.outcome, round(memory.length)) == (CROSSES, 70)
    assert time.length == pytest.approx(_cab_formula(CAB_LENGTHS, CAB_TIME["vanilla"], CAB_TIME["abc"], 1), rel=1e-9)
    assert memory.length == pytest.approx(_cab_formula(CAB_LENGTHS, CAB_MEMORY["vanilla"], CAB_MEMORY["abc"], 0),
                                          rel=1e-9)
    assert time.details["r2_exact"] > 0.99 and time.details["skip_shortest"] is True


def test_robust_method_on_cabs_curves_sees_abc_cheaper_from_512():
    """CAB's own measurements have ABC faster than vanilla from 512 tokens on: the quadratic fit, not the
    data, puts the crossing at 1,877."""
    found = efficiency_length(CAB_LENGTHS, CAB_TIME["vanilla"], CAB_TIME["abc"])
    assert found.outcome == CROSSES and found.first_cheaper == 512
    ratio0, ratio1 = 0.648 / 0.472, 0.59 / 0.628
    t = math.log(ratio0) / (math.log(ratio0) - math.log(ratio1))
    assert found.length == pytest.approx(256 * 2 ** t, rel=1e-12)
    assert found.low is None and found.high is None  # one value per length: nothing to resample


def test_cab_method_closed_form_on_constructed_curves():
    lengths = [256, 512, 1024, 2048, 4096]
    exact = [2e-6 * n ** 2 + 1e-4 * n + 0.5 for n in lengths]
    efficient = [2.1e-3 * n + 0.5 for n in lengths]  # 2e-6 n^2 + 1e-4 n = 2.1e-3 n  ->  n = 1000
    assert efficiency_length(lengths, exact, efficient, "cab").length == pytest.approx(1000.0, rel=1e-9)
    never = efficiency_length(lengths, [1.0 + 0 * n for n in lengths], [2.0 + 1e-3 * n for n in lengths], "cab")
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
