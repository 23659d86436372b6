"""Small statistics the analyses share: per-length sample sets, their medians, bootstrap resampling of
them, least squares, and Student's t quantiles (numpy only, no scipy)."""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np

Value = Union[float, Sequence[float]]  # one measurement, or every sample taken at one length


def sample_sets(values: Sequence[Value]) -> "list[np.ndarray]":
    """Each entry as a 1-D float array of its samples (a number is one sample); empty, NaN or
    non-positive entries are refused, since costs are positive and every length needs a measurement."""
    sets = []
    for i, value in enumerate(values):
        array = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
        if array.size == 0:
            raise ValueError(f"entry {i} has no samples")
        if not np.all(np.isfinite(array)) or np.any(array <= 0):
            raise ValueError(f"entry {i} holds a non-finite or non-positive cost: {array[:5].tolist()}")
        sets.append(array)
    return sets


def medians(sets: "Sequence[np.ndarray]") -> np.ndarray:
    return np.array([float(np.median(s)) for s in sets])


def has_spread(sets: "Sequence[np.ndarray]") -> bool:
    """True when some length has several distinct samples (a bootstrap has something to resample)."""
    return any(s.size > 1 and np.ptp(s) > 0 for s in sets)


def bootstrap_medians(sets: "Sequence[np.ndarray]", n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, len(sets)): medians of each length's samples resampled with replacement."""
    out = np.empty((n_boot, len(sets)))
    for j, samples in enumerate(sets):
        picks = rng.integers(0, samples.size, size=(n_boot, samples.size))
        out[:, j] = np.median(samples[picks], axis=1)
    return out


def least_squares(x: np.ndarray, y: np.ndarray, degree: int) -> "tuple[np.ndarray, float]":
    """(coefficients, highest power first; R^2) of the ordinary least-squares polynomial fit."""
    coefficients = np.polyfit(x, y, degree)
    residual = y - np.polyval(coefficients, x)
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual ** 2)) / total if total > 0 else 1.0
    return coefficients, r2


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                          -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with `df` degrees of freedom (near 0 through the complementary
    form, where df / (df + t^2) would round to 1)."""
    if t * t < df:
        central = 0.5 * regularized_beta(0.5, df / 2.0, t * t / (df + t * t))
        return 0.5 + central if t >= 0 else 0.5 - central
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on t_cdf to 1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (low + high)
