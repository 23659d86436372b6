"""How conformance measures disagreement between tensors, and the tolerances it holds them to.

Every structural comparison (prefix, gradient leaks, padding, reference) is relative to the scale of the
expected tensor: max |actual - expected| / max |expected|. The tolerances are chosen so that a leak of
weight 1e-3 (a relative deviation of roughly 1e-4 to 1e-3) fails in float64 and float32, while the
round-off of an honest implementation (about 1e-15 in float64, 1e-6 in float32) passes with margin.
"""

from __future__ import annotations

import math

import torch

# Relative tolerance of the structural checks, per dtype the check ran in. float64 is preferred; float32 is
# the fallback for attentions that cannot run in float64; half types only for attentions running in nothing
# else (a 1e-3 leak is then below the dtype's resolution, and the check message says so).
STRUCTURAL_TOLERANCE = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

# exact_oracle: an exact kernel's max-abs error against the float64 oracle may be at most
# ORACLE_FACTOR x (plain eager attention's error in the same dtype) + ORACLE_ULPS[dtype] x eps x max|oracle|.
# The additive term is in ulps of the tensor's scale: in float32/float64 eager's own error is below one ulp,
# so twice it is smaller than the reordering noise of a fused or chunked kernel (measured on PyTorch's SDPA
# and the chunked built-in over 6 seeds and the check shapes: up to ~5 ulps beyond 2x eager); in half
# precision eager's error already spans several ulps and the measured excess stays near 1 ulp.
ORACLE_FACTOR = 2.0
ORACLE_ULPS = {torch.float64: 16.0, torch.float32: 16.0, torch.float16: 4.0, torch.bfloat16: 4.0}
LOGIT_ULPS_FROM = 4.0  # |logit| from which the ulps allowance scales with the scores (unit inputs reach ~6)


def structural_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of the structural checks in `dtype`."""
    return STRUCTURAL_TOLERANCE[dtype]


def max_abs(x: torch.Tensor) -> float:
    """max |x| as a float (0 for an empty tensor; inf when x holds NaN or inf)."""
    if x.numel() == 0:
        return 0.0
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        return math.inf
    return float(x.abs().max())


def abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| computed in float64 (inf when either holds NaN or inf)."""
    if actual.shape != expected.shape:
        raise ValueError(f"cannot compare shapes {tuple(actual.shape)} and {tuple(expected.shape)}")
    return max_abs(actual.detach().to(torch.float64) - expected.detach().to(torch.float64))


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: "float | None" = None) -> float:
    """max |actual - expected| / scale, the scale defaulting to max |expected| (inf for non-finite values)."""
    error = abs_error(actual, expected)
    scale = max_abs(expected) if scale is None else scale
    if not math.isfinite(error) or not math.isfinite(scale):
        return math.inf
    return error / max(scale, torch.finfo(torch.float64).tiny)


def oracle_allowance(eager_error: float, oracle_scale: float, dtype: torch.dtype, max_logit: float = 0.0) -> float:
    """How far an exact kernel in `dtype` may be from the float64 oracle (see ORACLE_FACTOR/ORACLE_ULPS).

    With scores of magnitude `max_logit` the rounding of the scores themselves moves each softmax weight by
    about max_logit x eps (relative), however the kernel orders its arithmetic: past LOGIT_ULPS_FROM the
    ulps term grows in proportion, so a fused kernel's online rescaling is not held to eager's luck."""
    ulps = ORACLE_ULPS[dtype] * max(1.0, max_logit / LOGIT_ULPS_FROM)
    return ORACLE_FACTOR * eager_error + ulps * torch.finfo(dtype).eps * oracle_scale


def consistent_error(actual: torch.Tensor, expected: torch.Tensor, scale: "float | None" = None) -> float:
    """relative_error over the positions where both tensors are finite, or inf when their non-finite values
    are not in the same places: for comparisons of one computation with itself (determinism,
    independence), where a NaN the attention always produces is `finite`'s business, not theirs."""
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(e.shape)}")
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    if not torch.equal(fa, fe) or not torch.equal(a[~fa].nan_to_num(0.0, 1.0, -1.0), e[~fe].nan_to_num(0.0, 1.0, -1.0)):
        return math.inf
    if scale is None:
        scale = max_abs(e[fe])
    return relative_error(a[fa], e[fe], scale)


# In half precision a content-based choice (a top-k, an argmin, a threshold, a tree descent) can flip between
# dtypes, so a half-precision forward legitimately differs from the float64 truth wherever a flip lands (its
# max error means nothing). Value comparisons across dtypes there (reference, decode) hold the relative L2
# error of each tensor instead: measured on the built-ins in bfloat16, at most 0.14 (probsparse's dq, where
# top-u query choices flip); a wrong path (a missing mask, a non-causal kernel, a wrong scale) is far beyond.
HALF_PRECISION = (torch.float16, torch.bfloat16)
HALF_L2_TOLERANCE = 0.25


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (inf for non-finite values)."""
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(e.shape)}")
    if not bool(torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.inf
    norm = float(e.norm())
    return float((a - e).norm()) / max(norm, torch.finfo(torch.float64).tiny) if a.numel() else 0.0
