"""The efficiency length: the sequence length from which an efficient attention is cheaper (in time or
memory) than an exact one.

`method="cab"` is CAB's computation (scripts/efficiency_length/efficiency_length.py in Shark-NLP/CAB),
step by step, for the `metric` it is given:

- the cost at each length: for time, the mean of the samples between the 25th and 75th percentiles
  (midpoint interpolation), as CAB's efficiency_test.py averages its 100 timings; for memory, the one
  reading per length CAB takes (the median when a store pools several);
- the exact curve: a least-squares quadratic a n^2 + b n + c through every length;
- the efficient curve: a least-squares line d n + e, for memory through every length, for time through
  every length but the shortest (CAB fits `seq_lengths[1:]` for time only);
- the crossing: CAB's root of (a n^2 + b n + c) - (d n + e), (-(b - d) + sqrt((b - d)^2 - 4a(c - e))) / 2a,
  the root at which the difference rises through zero, i.e. where the efficient line drops below the
  quadratic as n grows. It is reported when it is real and positive; otherwise the outcome is
  "no_crossing" (CAB's script then prints NaN or a negative length), with CAB's root in `details`.

Unit scales (CAB fits time x 1000) do not move the crossing. On CAB's raw curves this gives CAB's published
ABC figures (1,877 tokens for time, 70 for memory); docs/reproductions.md has the comparison.

`method="robust"` (the default) makes no assumption about the curves' shapes: it compares per-length
medians, finds where the cost ratio efficient / exact falls below 1 for good (interpolating log ratio
linearly in log length between the two measured lengths around that point, i.e. a piecewise power-law
fit of each curve), reports the first measured length where the efficient method is cheaper, says so
explicitly when it is cheaper everywhere or nowhere in the measured range, and gives a bootstrap
interval of the crossing by resampling each length's timing samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cab.analysis.stats import Value, bootstrap_medians, has_spread, least_squares, medians, sample_sets

METHODS = ("robust", "cab")
# outcomes: the efficient method becomes cheaper inside the range for good, is cheaper at every measured
# length, at none, or at some but not at the longest (so no crossing "for good" can be named)
CROSSES, ALWAYS, NEVER, ENDS_DEARER = "crosses", "always_cheaper", "never_cheaper", "ends_dearer"
NO_CROSSING = "no_crossing"  # method "cab": the fitted curves have no positive crossing


@dataclass(frozen=True)
class EfficiencyLength:
    """The answer of `efficiency_length`.

    `length` is the crossing (None unless outcome is "crosses", or for "cab" a root exists). `low`/`high`
    bound its bootstrap interval; -inf / inf mean the interval runs past the shortest / longest measured
    length (in some resamples the method is cheaper everywhere / nowhere); both are None when there was
    nothing to resample. `first_cheaper` is the first measured length where the efficient median is lower.
    """

    method: str
    outcome: str
    length: "float | None"
    low: "float | None" = None
    high: "float | None" = None
    first_cheaper: "int | None" = None
    lengths: "tuple[int, ...]" = ()
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: an infinite interval end becomes None with `low_side` / `high_side` set to
        "below_range" (-inf) or "above_range" (inf); both sides are "" for a finite end."""
        def finite(x: "float | None") -> "float | None":
            return None if x is None or math.isinf(x) else float(x)

        def side(x: "float | None") -> str:
            if x is None or not math.isinf(x):
                return ""
            return "below_range" if x < 0 else "above_range"

        return {
            "method": self.method, "outcome": self.outcome, "length": finite(self.length),
            "low": finite(self.low), "high": finite(self.high), "low_side": side(self.low),
            "high_side": side(self.high), "first_cheaper": self.first_cheaper, "lengths": list(self.lengths),
            **self.details,
        }


def _checked(lengths: Sequence[int], exact: Sequence[Value], efficient: Sequence[Value]):
    if not (len(lengths) == len(exact) == len(efficient)):
        raise ValueError(f"need one exact and one efficient entry per length, got {len(lengths)} lengths, "
                         f"{len(exact)} exact and {len(efficient)} efficient entries")
    x = np.asarray(lengths, dtype=np.float64)
    if x.size < 2 or np.any(x <= 0) or np.any(np.diff(x) <= 0):
        raise ValueError(f"need at least two positive, strictly increasing lengths, got {list(lengths)}")
    return x, sample_sets(exact), sample_sets(efficient)


def crossing_of_medians(
    x: np.ndarray, exact: np.ndarray, efficient: np.ndarray
) -> "tuple[str, float | None, int | None]":
    """(outcome, crossing, index of the first cheaper length) from per-length costs."""
    cheaper = efficient < exact
    first = int(np.argmax(cheaper)) if cheaper.any() else None
    if cheaper.all():
        return ALWAYS, None, first
    if not cheaper.any():
        return NEVER, None, first
    if not cheaper[-1]:
        return ENDS_DEARER, None, first
    j = int(np.nonzero(~cheaper)[0][-1])  # the last length where it is not cheaper; cheaper from j + 1 on
    r0, r1 = math.log(efficient[j] / exact[j]), math.log(efficient[j + 1] / exact[j + 1])
    t = r0 / (r0 - r1)  # r0 >= 0 > r1, so 0 <= t < 1
    crossing = math.exp(math.log(x[j]) + t * (math.log(x[j + 1]) - math.log(x[j])))
    return CROSSES, crossing, first


def _robust(x, exact_sets, efficient_sets, confidence: float, n_boot: int, seed: int) -> EfficiencyLength:
    exact_med, efficient_med = medians(exact_sets), medians(efficient_sets)
    outcome, crossing, first = crossing_of_medians(x, exact_med, efficient_med)
    details = {"exact_medians": exact_med.tolist(), "efficient_medians": efficient_med.tolist()}
    low = high = None
    if n_boot > 0 and (has_spread(exact_sets) or has_spread(efficient_sets)):
        rng = np.random.default_rng(seed)
        boot_exact = bootstrap_medians(exact_sets, n_boot, rng)
        boot_efficient = bootstrap_medians(efficient_sets, n_boot, rng)
        draws, counts = np.empty(n_boot), {CROSSES: 0, ALWAYS: 0, NEVER: 0, ENDS_DEARER: 0}
        for i in range(n_boot):
            kind, value, _ = crossing_of_medians(x, boot_exact[i], boot_efficient[i])
            counts[kind] += 1
            draws[i] = value if kind == CROSSES else (-math.inf if kind == ALWAYS else math.inf)
        tail = 100.0 * (1.0 - confidence) / 2.0
        low, high = (float(np.percentile(draws, q, method="lower" if q < 50 else "higher")) for q in (tail, 100 - tail))
        details["bootstrap"] = {"resamples": n_boot, "confidence": confidence,
                                "outcomes": {k: v / n_boot for k, v in counts.items()}}
    return EfficiencyLength("robust", outcome, crossing, low, high,
                            None if first is None else int(x[first]), tuple(int(v) for v in x), details)


CAB_METRICS = ("time", "memory")
MIN_LENGTHS = {"robust": 2, "cab": 3}  # CAB's quadratic needs three lengths


def cab_time_cost(samples: np.ndarray) -> float:
    """CAB's cost of one length from its timing samples: the mean of the samples between the 25th and the
    75th percentile (numpy's "midpoint" interpolation), both ends included."""
    low, high = np.percentile(samples, (25, 75), method="midpoint")
    kept = samples[(samples >= low) & (samples <= high)]
    return float(np.mean(kept))


def cab_crossing(exact_fit: Sequence[float], efficient_fit: Sequence[float]) -> float:
    """CAB's root of (a n^2 + b n + c) - (d n + e): (-(b - d) + sqrt((b - d)^2 - 4a(c - e))) / 2a, the
    root where the difference rises through zero. NaN where CAB's formula has no real value (a negative
    discriminant, or a = 0)."""
    (a, b, c), (d, e) = exact_fit, efficient_fit
    discriminant = (b - d) ** 2 - 4.0 * a * (c - e)
    if discriminant < 0 or a == 0:
        return math.nan
    return (-(b - d) + math.sqrt(discriminant)) / (2.0 * a)


def _cab(x, exact_sets, efficient_sets, metric: str) -> EfficiencyLength:
    if metric == "time":
        exact_y = np.array([cab_time_cost(s) for s in exact_sets])
        efficient_y = np.array([cab_time_cost(s) for s in efficient_sets])
        start = 1  # CAB: LinearRegression().fit(seq_lengths[1:], time[1:])
    else:
        exact_y, efficient_y = medians(exact_sets), medians(efficient_sets)
        start = 0
    if x.size < MIN_LENGTHS["cab"]:
        raise ValueError(f"CAB's fit needs at least {MIN_LENGTHS['cab']} lengths (a quadratic through the exact "
                         f"curve), got {x.size}")
    (a, b, c), r2_exact = least_squares(x, exact_y, 2)
    (d, e), r2_efficient = least_squares(x[start:], efficient_y[start:], 1)
    root = cab_crossing((a, b, c), (d, e))
    crossing = root if math.isfinite(root) and root > 0 else None
    cheaper = efficient_y < exact_y
    first = int(x[int(np.argmax(cheaper))]) if cheaper.any() else None
    details = {"metric": metric, "exact_points": exact_y.tolist(), "efficient_points": efficient_y.tolist(),
               "exact_fit": [float(a), float(b), float(c)], "efficient_fit": [float(d), float(e)],
               "exact_fit_lengths": [int(v) for v in x], "efficient_fit_lengths": [int(v) for v in x[start:]],
               "r2_exact": r2_exact, "r2_efficient": r2_efficient,
               "cab_root": None if math.isnan(root) else float(root)}
    return EfficiencyLength("cab", CROSSES if crossing is not None else NO_CROSSING, crossing,
                            first_cheaper=first, lengths=tuple(int(v) for v in x), details=details)


def efficiency_length(
    lengths: Sequence[int],
    exact_values: Sequence[Value],
    efficient_values: Sequence[Value],
    method: str = "robust",
    *,
    metric: "str | None" = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> EfficiencyLength:
    """Where the efficient curve drops below the exact one.

    Each value is one cost per length (a time in any unit, bytes) or the list of samples taken there
    (medians are compared; the samples feed the robust method's bootstrap). Method "cab" needs `metric`,
    "time" or "memory": CAB treats the two differently (see the module docstring); the robust method
    treats both alike and ignores it."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if method == "cab" and metric not in CAB_METRICS:
        raise ValueError(f"method 'cab' needs metric 'time' or 'memory' (CAB fits them differently), got {metric!r}")
    x, exact_sets, efficient_sets = _checked(lengths, exact_values, efficient_values)
    if method == "cab":
        return _cab(x, exact_sets, efficient_sets, metric)
    return _robust(x, exact_sets, efficient_sets, confidence, n_boot, seed)
