"""cab.stats against closed forms, printed tables, brute-force definitions and hand-computed examples."""

import math
import statistics

import pandas as pd
import pytest

from cab.stats import (
    Summary,
    benjamini_hochberg,
    compositional_index,
    pairwise_comparisons,
    rank_with_ties,
    regularized_incomplete_beta,
    separated,
    student_t_cdf,
    student_t_quantile,
    summarize,
    welch_t_test,
)


def t_cdf_integer_df(t: float, df: int) -> float:
    """Abramowitz & Stegun 26.7.3/26.7.4: the t CDF for integer df as a finite trigonometric series."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        two_sided = 2 / math.pi * (theta + (math.sin(theta) * total if df > 1 else 0.0))
    else:
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        two_sided = math.sin(theta) * total
    return 0.5 + 0.5 * two_sided


def t_cdf_quadrature(t: float, df: float, steps: int = 20000) -> float:
    """P(T <= t) by Simpson's rule on the t density from 0 to |t| (independent of the incomplete beta)."""
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    density = lambda x: norm * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = abs(t) / steps
    area = density(0) + density(abs(t)) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    half = area * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


@pytest.mark.parametrize("t", [-7.0, -2.5, -0.3, 0.0, 0.4, 1.96, 3.2, 12.0])
def test_t_cdf_matches_closed_forms(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    for df in (3, 4, 5, 8, 13, 30):
        assert student_t_cdf(t, df) == pytest.approx(t_cdf_integer_df(t, df), abs=1e-11)


@pytest.mark.parametrize("df", [0.7, 2.5, 5.88, 17.3])
def test_t_cdf_for_fractional_df_matches_quadrature(df):
    for t in (-3.0, -0.8, 0.5, 2.2):
        assert student_t_cdf(t, df) == pytest.approx(t_cdf_quadrature(t, df), abs=1e-8)


def test_t_cdf_tends_to_the_normal():
    for t in (-2.0, 0.5, 1.96):
        assert student_t_cdf(t, 1e7) == pytest.approx(0.5 * (1 + math.erf(t / math.sqrt(2))), abs=1e-6)
    assert student_t_cdf(math.inf, 3) == 1.0 and student_t_cdf(-math.inf, 3) == 0.0


# two-sided 95% critical values from printed t tables
@pytest.mark.parametrize("df, critical", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452),
                                          (120, 1.9799)])
def test_t_quantile_matches_tables(df, critical):
    assert student_t_quantile(0.975, df) == pytest.approx(critical, abs=5e-5)
    assert student_t_quantile(0.025, df) == pytest.approx(-critical, abs=5e-5)


def test_t_quantile_inverts_the_cdf():
    for df in (1, 3.5, 10):
        for p in (0.01, 0.3, 0.5, 0.9, 0.999):
            assert student_t_cdf(student_t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_incomplete_beta_special_cases():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert regularized_incomplete_beta(1, 1, x) == pytest.approx(x)
        assert regularized_incomplete_beta(3, 1, x) == pytest.approx(x ** 3)
        assert regularized_incomplete_beta(1, 4, x) == pytest.approx(1 - (1 - x) ** 4)
        mirrored = 1 - regularized_incomplete_beta(0.7, 2.5, 1 - x)
        assert regularized_incomplete_beta(2.5, 0.7, x) == pytest.approx(mirrored)
    with pytest.raises(ValueError):
        regularized_incomplete_beta(0, 1, 0.5)


def test_summary_mean_std_and_interval():
    values = [0.71, 0.69, 0.74, 0.70]
    s = summarize(values)
    assert s.n == 4
    assert s.mean == pytest.approx(statistics.fmean(values))
    assert s.std == pytest.approx(statistics.stdev(values))
    half = 3.1824 * statistics.stdev(values) / 2  # t(0.975, 3) = 3.1824 (tables)
    assert (s.ci_low, s.ci_high) == (pytest.approx(s.mean - half, abs=1e-5), pytest.approx(s.mean + half, abs=1e-5))
    assert s.half_width == pytest.approx(half, abs=1e-5)


def test_summary_of_one_value_has_no_interval_and_nan_is_dropped():
    s = summarize([2.0, float("nan"), None])
    assert s.n == 1 and s.mean == 2.0
    assert math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    with pytest.raises(ValueError):
        summarize([float("nan")])


def interval(low, high):
    return Summary(3, (low + high) / 2, 1.0, low, high)


def test_ranking_separates_only_non_overlapping_intervals():
    summaries = {"a": interval(0.80, 0.90), "b": interval(0.60, 0.70), "c": interval(0.65, 0.75),
                 "d": interval(0.20, 0.30)}
    assert rank_with_ties(summaries, higher_is_better=True) == {"a": 1, "b": 2, "c": 2, "d": 4}
    assert rank_with_ties(summaries, higher_is_better=False) == {"a": 4, "b": 2, "c": 2, "d": 1}


def test_ranking_with_a_chain_of_overlaps():
    # a and c separate, b overlaps both: b ties with each, c is beaten by a only
    summaries = {"a": interval(0.8, 0.9), "b": interval(0.7, 0.85), "c": interval(0.6, 0.75)}
    assert rank_with_ties(summaries, higher_is_better=True) == {"a": 1, "b": 1, "c": 2}


def test_single_seed_results_all_tie():
    summaries = {name: summarize([v]) for name, v in (("a", 0.9), ("b", 0.1))}
    assert rank_with_ties(summaries, higher_is_better=True) == {"a": 1, "b": 1}
    assert not separated(summaries["a"], summaries["b"], True)


def test_welch_matches_quadrature_and_degenerate_cases():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    va, vb = statistics.variance(a) / 5, statistics.variance(b) / 5
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 4 + vb ** 2 / 4)
    assert df == pytest.approx(5.882, abs=1e-3)
    expected = 2 * (1 - t_cdf_quadrature(abs(t), df))
    assert welch_t_test(a, b) == pytest.approx(expected, abs=1e-8)
    assert welch_t_test(b, a) == pytest.approx(expected, abs=1e-8)
    assert welch_t_test([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert welch_t_test([1.0, 1.0], [2.0, 2.0]) == 0.0
    with pytest.raises(ValueError):
        welch_t_test([1.0], [1.0, 2.0])


def brute_force_bh(pvalues, alpha):
    """Reject the k smallest p-values for the largest k with p_(k) <= k alpha / m."""
    m = len(pvalues)
    ordered = sorted(pvalues)
    k = max((i for i in range(1, m + 1) if ordered[i - 1] <= i * alpha / m), default=0)
    threshold = ordered[k - 1] if k else -1.0
    return [p <= threshold for p in pvalues]


def test_benjamini_hochberg():
    rejected, q = benjamini_hochberg([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert q == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert rejected == [True, True, True, True]
    pvalues = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216, 0.222, 0.251, 0.269, 0.275,
               0.34, 0.341, 0.384, 0.569, 0.594, 0.696, 0.762, 0.94, 0.942, 0.975, 0.986]
    for alpha in (0.05, 0.25):
        assert benjamini_hochberg(pvalues, alpha)[0] == brute_force_bh(pvalues, alpha)
    assert sum(benjamini_hochberg(pvalues, 0.25)[0]) == 6  # p_(6) = 0.06 <= 6 x 0.25 / 25, p_(7) = 0.074 > 0.07
    assert benjamini_hochberg([], 0.05) == ([], [])


def test_pairwise_comparisons_control_the_family():
    samples = {"a": [0.90, 0.91, 0.92], "b": [0.50, 0.52, 0.51], "c": [0.905, 0.915, 0.91], "single": [0.3]}
    comparisons = {(c.a, c.b): c for c in pairwise_comparisons(samples)}
    assert set(comparisons) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert comparisons[("a", "b")].significant and not comparisons[("a", "c")].significant
    assert comparisons[("a", "b")].difference == pytest.approx(0.40)
    ps = [c.p for c in comparisons.values()]
    assert [c.q for c in comparisons.values()] == pytest.approx(benjamini_hochberg(ps)[1])


def long_rows(rows):
    return pd.DataFrame(rows, columns=["task", "pattern", "attention", "metric", "value", "direction"])


def test_compositional_index_by_hand():
    # pattern CS: task lm (bpc, lower better, two seeds for x), task recall (accuracy); pattern NS: recall
    rows = [
        ("lm", "CS", "x", "bpc", 2.0, -1), ("lm", "CS", "x", "bpc", 2.2, -1),
        ("lm", "CS", "vanilla", "bpc", 1.5, -1), ("lm", "CS", "y", "bpc", 2.5, -1),
        ("recall", "CS", "x", "accuracy", 0.9, 1), ("recall", "CS", "vanilla", "accuracy", 0.9, 1),
        ("recall", "CS", "y", "accuracy", 0.3, 1),
        ("recall", "NS", "x", "accuracy", 0.5, 1), ("recall", "NS", "y", "accuracy", 0.5, 1),
    ]
    result = compositional_index(long_rows(rows))
    lm = {"x": 2.1, "vanilla": 1.5, "y": 2.5}
    recall = {"x": 0.9, "vanilla": 0.9, "y": 0.3}

    def z(values, name, direction):
        mu = statistics.fmean(values.values())
        sigma = statistics.pstdev(values.values())
        return direction * (values[name] - mu) / sigma

    table = result.table.set_index(["pattern", "attention"])
    for name in ("x", "vanilla", "y"):
        expected = (z(lm, name, -1) + z(recall, name, 1)) / 2
        assert table.loc[("CS", name), "index"] == pytest.approx(expected)
        assert table.loc[("CS", name), "n_tasks"] == 2
        assert table.loc[("CS", name), "delta_vanilla"] == pytest.approx(
            expected - (z(lm, "vanilla", -1) + z(recall, "vanilla", 1)) / 2)
    # equal results give sigma 0 and z 0, not NaN
    assert table.loc[("NS", "x"), "index"] == 0.0 and table.loc[("NS", "y"), "index"] == 0.0
    assert list(result.table[result.table["pattern"] == "CS"]["attention"]) == ["vanilla", "x", "y"]
    reference = result.reference.set_index(["task", "pattern", "metric"])
    assert reference.loc[("lm", "CS", "bpc"), "mu"] == pytest.approx(statistics.fmean(lm.values()))
    assert reference.loc[("lm", "CS", "bpc"), "attentions"] == "vanilla, x, y"
    assert reference.loc[("recall", "NS", "accuracy"), "sigma"] == 0.0


def test_compositional_index_needs_its_columns():
    with pytest.raises(ValueError, match="direction"):
        compositional_index(pd.DataFrame({"task": [], "pattern": [], "attention": [], "metric": [], "value": []}))
