"""Statistics of task results over seeds: summaries with 95% confidence intervals, ranking with ties,
Welch's t-test with Benjamini-Hochberg control of the false discovery rate, and CAB's compositional index.

Pure Python and pandas (no SciPy): the Student t distribution is computed from the regularised incomplete
beta function, which is all the intervals and tests need.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pandas as pd

CONFIDENCE = 0.95


# the Student t distribution --------------------------------------------------------------------------

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            result *= step
        if abs(step - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"need a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with `df` (> 0, not necessarily integer) degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on the CDF, to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


# summaries and ranking ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof 1) and the t-based confidence interval of the mean over seeds.
    With a single value the spread and the interval are undefined (NaN)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2.0

    def to_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci_low": self.ci_low, "ci_high": self.ci_high}


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Summary of the per-seed values of one (task, attention, pattern, metric); NaN values are dropped."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        raise ValueError("no finite values to summarise")
    n, mean = len(xs), math.fsum(xs) / len(xs)
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def separated(better: Summary, worse: Summary, higher_is_better: bool) -> bool:
    """True when `better`'s interval lies entirely on the better side of `worse`'s (they do not overlap).
    Undefined intervals (a single seed) never separate."""
    if any(math.isnan(v) for v in (better.ci_low, better.ci_high, worse.ci_low, worse.ci_high)):
        return False
    return better.ci_low > worse.ci_high if higher_is_better else better.ci_high < worse.ci_low


def rank_with_ties(summaries: Mapping[str, Summary], higher_is_better: bool) -> "dict[str, int]":
    """Rank of each name: 1 + the number of others whose confidence interval is separated from its own on
    the better side. Overlapping intervals are ties, so two names are ranked apart only when the seed
    noise cannot explain their difference (with one seed everything ties at rank 1)."""
    return {
        name: 1 + sum(separated(other, mine, higher_is_better) for o, other in summaries.items() if o != name)
        for name, mine in summaries.items()
    }


# significance across many comparisons ---------------------------------------------------------------

def welch_t_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test for equal means (unequal variances); each sample needs at
    least two values. Two constant samples give p = 1 when equal and 0 otherwise."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least two values per sample")
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0.0:
        return 1.0 if sa.mean == sb.mean else 0.0
    t = (sa.mean - sb.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (sa.n - 1) if va else 0.0) + (vb ** 2 / (sb.n - 1) if vb else 0.0))
    return min(1.0, 2.0 * (1.0 - student_t_cdf(abs(t), df)))


def benjamini_hochberg(pvalues: Sequence[float], alpha: float = 0.05) -> "tuple[list[bool], list[float]]":
    """(rejected, adjusted q-values) controlling the false discovery rate at `alpha` (Benjamini & Hochberg
    1995, step-up): q_(i) = min over j >= i of m p_(j) / j, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, pvalues[i] * m / rank)
        adjusted[i] = min(1.0, running)
    return [q <= alpha for q in adjusted], adjusted


@dataclass(frozen=True)
class Comparison:
    """One pairwise comparison: mean difference a - b, Welch p-value and BH-adjusted q-value."""

    a: str
    b: str
    difference: float
    p: float
    q: float
    significant: bool


def pairwise_comparisons(samples: Mapping[str, Sequence[float]], alpha: float = 0.05) -> "list[Comparison]":
    """Every pair of names with at least two values each, tested with Welch's t-test, the family of all
    pairs controlled for the false discovery rate with Benjamini-Hochberg."""
    names = [n for n in samples if len(samples[n]) >= 2]
    pairs = list(itertools.combinations(names, 2))
    pvalues = [welch_t_test(samples[a], samples[b]) for a, b in pairs]
    rejected, qvalues = benjamini_hochberg(pvalues, alpha)
    return [
        Comparison(a, b, summarize(samples[a]).mean - summarize(samples[b]).mean, p, q, r)
        for (a, b), p, q, r in zip(pairs, pvalues, qvalues, rejected)
    ]


# CAB's compositional index ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CompositionalIndex:
    """Per-pattern compositional index. `table`: pattern, attention, index, n_tasks (and delta_<baseline>
    when the baseline is present); `per_task`: the task scores it averages; `reference`: for every
    (task, pattern, metric), the mu and sigma used and the attentions they were computed from."""

    table: pd.DataFrame
    per_task: pd.DataFrame
    reference: pd.DataFrame


LONG_COLUMNS = ("task", "pattern", "attention", "metric", "value", "direction")


def compositional_index(results: pd.DataFrame, baseline: "str | None" = "vanilla") -> CompositionalIndex:
    """CAB's compositional index with mu and sigma computed from the results being ranked.

    `results` is long: one row per seed and metric with columns task, pattern, attention, metric, value and
    direction (+1 higher is better, -1 lower is better). Values are averaged over seeds; every metric of a
    (task, pattern) becomes z = direction * (x - mu) / sigma with mu and sigma (population, ddof 0) over the
    attentions that have it (z = 0 when sigma is 0); z is averaged over the metrics of a task, then over the
    tasks of the pattern (n_tasks says how many an attention has). The reference set is therefore the
    attentions present in `results` for each (task, pattern, metric), listed in `reference`."""
    missing = [c for c in LONG_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"results need the columns {', '.join(LONG_COLUMNS)}; missing {', '.join(missing)}")
    data = results.dropna(subset=["value"])
    keys = ["task", "pattern", "metric"]
    means = data.groupby(keys + ["attention"], as_index=False).agg(value=("value", "mean"),
                                                                   direction=("direction", "first"))
    grouped = means.groupby(keys)["value"]
    means["mu"] = grouped.transform("mean")
    means["sigma"] = grouped.transform(lambda v: v.std(ddof=0))
    spread = means["sigma"] > 0
    means["z"] = 0.0
    means.loc[spread, "z"] = (means["direction"] * (means["value"] - means["mu"]) / means["sigma"])[spread]
    reference = (means.groupby(keys, as_index=False)
                 .agg(direction=("direction", "first"), mu=("mu", "first"), sigma=("sigma", "first"),
                      n_attentions=("attention", "size"), attentions=("attention", lambda a: ", ".join(sorted(a)))))
    per_task = means.groupby(["pattern", "task", "attention"], as_index=False).agg(score=("z", "mean"))
    table = per_task.groupby(["pattern", "attention"], as_index=False).agg(index=("score", "mean"),
                                                                         n_tasks=("task", "size"))
    if baseline is not None and baseline in set(table["attention"]):
        base = table[table["attention"] == baseline].set_index("pattern")["index"]
        table[f"delta_{baseline}"] = table["index"] - table["pattern"].map(base)
    table = table.sort_values(["pattern", "index"], ascending=[True, False], ignore_index=True)
    return CompositionalIndex(table=table, per_task=per_task, reference=reference)


__all__ = [
    "CONFIDENCE", "Comparison", "CompositionalIndex", "LONG_COLUMNS", "Summary", "benjamini_hochberg",
    "compositional_index", "pairwise_comparisons", "rank_with_ties", "regularized_incomplete_beta", "separated",
    "student_t_cdf", "student_t_quantile", "summarize", "welch_t_test",
]
