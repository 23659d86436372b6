"""Small statistics the analyses share: per-length sample sets, their medians, bootstrap resampling of
them, least squares (numpy only, no scipy; Student's t is `cab.stats`)."""

from __future__ import annotations

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
