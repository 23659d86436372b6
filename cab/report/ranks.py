"""Rank correlations for CAB's "consistency across patterns" analysis: do attentions rank the same way in
two patterns? Spearman's rho (Pearson correlation of average ranks) and Kendall's tau-b (ties corrected),
in plain Python (no SciPy)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence


def average_ranks(values: Sequence[float]) -> "list[float]":
    """Ranks 1..n of `values` (ascending), tied values sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(x: Sequence[float], y: Sequence[float]) -> "float | None":
    n = len(x)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> "float | None":
    """Spearman's rho; None with fewer than 3 pairs or when either side is constant."""
    if len(x) != len(y):
        raise ValueError("need paired values")
    if len(x) < 3:
        return None
    return _pearson(average_ranks(x), average_ranks(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> "float | None":
    """Kendall's tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)); None with fewer than 3 pairs or a constant side."""
    if len(x) != len(y):
        raise ValueError("need paired values")
    n = len(x)
    if n < 3:
        return None
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                ties_x += 1
                ties_y += 1
            elif dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = n * (n - 1) // 2
    denominator = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def pattern_correlations(scores: "Mapping[str, Mapping[str, float]]", patterns: Sequence[str]) -> "list[dict]":
    """For every ordered pair of patterns: the attentions scored in both, Spearman's rho and Kendall's tau-b
    of their scores (e.g. the compositional index per pattern)."""
    rows = []
    for a in patterns:
        for b in patterns:
            common = sorted(set(scores.get(a, {})) & set(scores.get(b, {})))
            x = [scores[a][n] for n in common]
            y = [scores[b][n] for n in common]
            rows.append({"pattern_a": a, "pattern_b": b, "n": len(common), "attentions": ", ".join(common),
                         "spearman": spearman(x, y) if common else None,
                         "kendall": kendall_tau_b(x, y) if common else None})
    return rows
