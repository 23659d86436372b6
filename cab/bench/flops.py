"""Dense-equivalent FLOPs of one attention call, counted from the pattern's visible pairs (never from the
implementation), so exact, sparse and linear rows compare like with like (MEASUREMENT.md)."""

from __future__ import annotations

import torch

from cab.patterns import Pattern, visible_pairs

FLOP_MODES = ("fwd", "fwd_infer", "bwd", "fwdbwd")


def dense_flops(
    pattern: "Pattern | str",
    batch: int,
    heads: int,
    lq: int,
    lk: int,
    dk: int,
    dv: int,
    mode: str,
    key_padding_mask: "torch.Tensor | None" = None,
    convention: str = "exact",
) -> int:
    """Matmul FLOPs of dense softmax attention restricted to the visible pairs (softmax excluded).

    Forward 2*B*Hq*pairs*(Dk+Dv); backward 2*B*Hq*pairs*(3*Dk+2*Dv) (dV, dP, dQ, dK and the QK^T
    recompute); fwdbwd the sum; fwd_infer equals fwd. With a (B, Lk) padding mask the pairs are already
    summed over the batch. convention="flash" counts causal self as L^2/2 like FlashAttention's figures.
    """
    if mode not in FLOP_MODES:
        raise ValueError(f"mode must be one of {', '.join(FLOP_MODES)}, got {mode!r}")
    if key_padding_mask is not None and key_padding_mask.shape[0] != batch:
        raise ValueError(f"key_padding_mask has {key_padding_mask.shape[0]} rows for a batch of {batch}")
    pairs = visible_pairs(pattern, lq, lk, key_padding_mask, convention=convention)
    total_pairs = heads * pairs if key_padding_mask is not None else batch * heads * pairs
    forward = 2 * total_pairs * (dk + dv)
    backward = 2 * total_pairs * (3 * dk + 2 * dv)
    if mode in ("fwd", "fwd_infer"):
        return forward
    if mode == "bwd":
        return backward
    return forward + backward
