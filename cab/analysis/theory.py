"""Theoretical cost exponents in the sequence length, shown beside the fitted ones: what an attention
declares (`Attention.complexity`, e.g. {"time": 2, "memory": 1}), else the usual exponent of its family
(log factors, as in L log L, count as 1)."""

from __future__ import annotations

from cab.registry import UnknownAttention, get_spec

# sub-quadratic families: linear time and memory in L. Exact attentions differ in memory (eager O(L^2),
# fused or chunked O(L)), so they must declare.
FAMILY_EXPONENTS = {
    family: {"time": 1.0, "memory": 1.0}
    for family in ("linear", "local", "lowrank", "low-rank", "sparse", "state-space", "hybrid", "recurrent")
}


def theoretical_exponent(attention: str, metric: str) -> "tuple[float | None, str]":
    """(exponent, where it comes from: "declared", "family" or "" when unknown) for a registered name."""
    try:
        spec = get_spec(attention)
    except UnknownAttention:
        return None, ""
    declared = getattr(spec.cls, "complexity", {}) or {}
    if metric in declared:
        return float(declared[metric]), "declared"
    family = FAMILY_EXPONENTS.get(spec.family, {})
    if metric in family:
        return family[metric], "family"
    return None, ""
