"""The empirical complexity exponent: the slope of log cost against log length over the measured range
(2 for a cost growing like L^2, 1 for a linear one), with a confidence interval.

The slope is the least-squares fit through the per-length medians. Its interval is a bootstrap over the
samples of each length when there are several (timings), else the Student-t interval of the regression
slope (one value per length, e.g. peak memory); with only two lengths there is no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cab.analysis.stats import Value, bootstrap_medians, has_spread, medians, sample_sets
from cab.stats import student_t_quantile


@dataclass(frozen=True)
class Exponent:
    """slope with [low, high] (None when there is no interval), the lengths fitted and how the interval
    was obtained ("bootstrap", "t" or "none")."""

    slope: float
    low: "float | None"
    high: "float | None"
    lengths: "tuple[int, ...]"
    interval: str

    def to_dict(self) -> dict:
        return {"slope": self.slope, "low": self.low, "high": self.high, "lengths": list(self.lengths),
                "interval": self.interval}


def _slope(log_x: np.ndarray, log_y: np.ndarray) -> float:
    centred = log_x - log_x.mean()
    return float(np.dot(centred, log_y - log_y.mean()) / np.dot(centred, centred))


def complexity_exponent(
    lengths: Sequence[int],
    values: Sequence[Value],
    *,
    min_length: "int | None" = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> Exponent:
    """Slope of log(cost) vs log(length) over the lengths >= min_length (all by default).

    Each value is one cost per length or the list of samples taken there."""
    if len(lengths) != len(values):
        raise ValueError(f"need one value per length, got {len(lengths)} lengths and {len(values)} values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    keep = [i for i, n in enumerate(lengths) if min_length is None or n >= min_length]
    x = np.asarray([lengths[i] for i in keep], dtype=np.float64)
    if x.size < 2 or np.any(x <= 0) or np.unique(x).size != x.size:
        raise ValueError(f"need at least two distinct positive lengths, got {x.astype(int).tolist()}")
    sets = sample_sets([values[i] for i in keep])
    log_x = np.log(x)
    slope = _slope(log_x, np.log(medians(sets)))
    fitted = tuple(int(v) for v in x)
    tail = (1.0 - confidence) / 2.0
    if n_boot > 0 and has_spread(sets):
        boot = np.log(bootstrap_medians(sets, n_boot, np.random.default_rng(seed)))
        centred = log_x - log_x.mean()
        slopes = (boot - boot.mean(axis=1, keepdims=True)) @ centred / np.dot(centred, centred)
        low, high = np.percentile(slopes, [100 * tail, 100 * (1 - tail)])
        return Exponent(slope, float(low), float(high), fitted, "bootstrap")
    if x.size >= 3:
        log_y = np.log(medians(sets))
        intercept = log_y.mean() - slope * log_x.mean()
        residual = log_y - (intercept + slope * log_x)
        dof = x.size - 2
        stderr = math.sqrt(float(np.dot(residual, residual)) / dof / float(np.sum((log_x - log_x.mean()) ** 2)))
        half = student_t_quantile(1.0 - tail, dof) * stderr
        return Exponent(slope, slope - half, slope + half, fitted, "t")
    return Exponent(slope, None, None, fitted, "none")
