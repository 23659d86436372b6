"""Complexity exponents: exact on power laws, Student-t interval against an independent computation,
bootstrap interval over samples, and the t quantiles against published table values."""

import math

import numpy as np
import pytest

from cab.analysis import complexity_exponent
from cab.stats import student_t_cdf as t_cdf
from cab.stats import student_t_quantile as t_quantile

LENGTHS = [256, 512, 1024, 2048, 4096, 8192]


@pytest.mark.parametrize("power", [1.0, 1.5, 2.0])
def test_power_law_slope_is_exact(power):
    fit = complexity_exponent(LENGTHS, [3.0 * n ** power for n in LENGTHS])
    assert fit.slope == pytest.approx(power, abs=1e-12)
    assert fit.interval == "t" and fit.high - fit.low == pytest.approx(0.0, abs=1e-9)


def test_t_interval_matches_an_independent_regression():
    values = [0.9, 2.2, 3.7, 9.1, 15.0, 33.0]
    fit = complexity_exponent(LENGTHS, values, confidence=0.95)
    x, y = np.log(LENGTHS), np.log(values)
    design = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), residual, *_ = np.linalg.lstsq(design, y, rcond=None)
    stderr = math.sqrt(residual[0] / (len(x) - 2) / np.sum((x - x.mean()) ** 2))
    assert fit.slope == pytest.approx(slope, rel=1e-12)
    assert (fit.low, fit.high) == pytest.approx((slope - 2.776445105 * stderr, slope + 2.776445105 * stderr), rel=1e-8)


def test_min_length_restricts_the_fit():
    values = [10.0, 10.0, 10.0, 4e-6 * 2048 ** 2, 4e-6 * 4096 ** 2, 4e-6 * 8192 ** 2]  # flat, then quadratic
    fit = complexity_exponent(LENGTHS, values, min_length=2048)
    assert fit.lengths == (2048, 4096, 8192) and fit.slope == pytest.approx(2.0)
    two = complexity_exponent(LENGTHS, values, min_length=4096)
    assert two.interval == "none" and two.low is None


def test_bootstrap_interval_over_samples_covers_the_true_slope():
    rng = np.random.default_rng(5)
    samples = [1e-3 * n ** 1.2 * np.exp(rng.normal(0, 0.05, 30)) for n in LENGTHS]
    fit = complexity_exponent(LENGTHS, samples, n_boot=500, seed=1)
    assert fit.interval == "bootstrap" and fit.low < 1.2 < fit.high and fit.high - fit.low < 0.1
    assert complexity_exponent(LENGTHS, samples, n_boot=500, seed=1) == fit


def test_refuses_too_few_or_repeated_lengths():
    with pytest.raises(ValueError, match="two distinct"):
        complexity_exponent([256, 256], [1.0, 2.0])
    with pytest.raises(ValueError, match="one value per length"):
        complexity_exponent([256, 512], [1.0])


@pytest.mark.parametrize("p,df,table", [
    (0.975, 1, 12.706204736), (0.975, 2, 4.302652730), (0.975, 4, 2.776445105), (0.975, 10, 2.228138852),
    (0.95, 30, 1.697260887), (0.025, 5, -2.570581836), (0.5, 7, 0.0),
])
def test_t_quantiles_match_tables(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=1e-8)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
