"""Input preparation shared by every mechanism: the accumulation dtype, grouped keys/values expanded to the
query heads, bottom-right alignment of causal self attention with Lq != Lk, the layout of real keys and query
positions, and the zero-safe normaliser. A mechanism's forward starts with `prepare` instead of repeating it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.patterns import Pattern


def softmax_scale(head_dim: int) -> float:
    """The usual 1/sqrt(d) score scale."""
    return head_dim ** -0.5


def zero_empty_rows(out: torch.Tensor, empty_rows: "torch.Tensor | None") -> torch.Tensor:
    """Zero the output rows whose query sees no key (empty_rows is bool (B, 1, Lq, 1) or None)."""
    if empty_rows is None:
        return out
    return out.masked_fill(empty_rows, 0.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in at least float32 (half-precision inputs are upcast)."""
    return torch.promote_types(dtype, torch.float32)


def align_bottom_right(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None"
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]":
    """Make Lq == Lk for bottom-right aligned causal self attention (query i sits at key position
    i + Lk - Lq): shorter queries get leading zero rows, shorter keys get leading padded keys.

    Returns (q, k, v, key_padding_mask, drop): drop the first `drop` output rows afterwards.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    if lq < lk:
        return F.pad(q, (0, 0, lk - lq, 0)), k, v, key_padding_mask, lk - lq
    if lq > lk:
        extra = lq - lk
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(k.shape[0], lk, dtype=torch.bool, device=k.device)
        key_padding_mask = F.pad(key_padding_mask.bool(), (extra, 0), value=True)
        k, v = F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))
    return q, k, v, key_padding_mask, 0


def set_positive(module: object, **values: int) -> None:
    """Set integer hyper-parameters that must be at least 1 as attributes of `module`; raises ValueError naming
    all of them when one is not."""
    if any(value < 1 for value in values.values()):
        got = " and ".join(str(v) for v in values.values())
        raise ValueError(f"{' and '.join(values)} must be positive, got {got}")
    for name, value in values.items():
        setattr(module, name, value)


def grouped_compute(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]":
    """(q, k, v, out_dtype): the inputs cast to `compute_dtype` of q's with grouped keys/values expanded to the
    query heads, and q's dtype, to cast the output back to."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    return q.to(dtype), repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype), out_dtype


def prepare(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None",
    dtype: "torch.dtype | None" = None,
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int, torch.dtype]":
    """Cast to `dtype` (default: `compute_dtype` of q's), expand grouped keys/values to the query heads and,
    under CS, align bottom-right. Returns (q, k, v, key_padding_mask, drop, out_dtype): drop the first
    `drop` output rows afterwards and cast the output back to out_dtype."""
    out_dtype = q.dtype
    dtype = compute_dtype(q.dtype) if dtype is None else dtype
    q, k, v = q.to(dtype), repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype)
    drop = 0
    if attn.pattern is Pattern.CS:
        q, k, v, key_padding_mask, drop = align_bottom_right(q, k, v, key_padding_mask)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    return q, k, v, key_padding_mask, drop, out_dtype


def real_keys(key_padding_mask: "torch.Tensor | None", batch: int, length: int,
              device: "torch.device | str | None") -> torch.Tensor:
    """(B, L) bool, True = a real (not padded) key."""
    if key_padding_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return ~key_padding_mask.to(device=device, dtype=torch.bool)


def key_weights(key_padding_mask: "torch.Tensor | None", batch: int, length: int,
                device: "torch.device | str | None", dtype: torch.dtype) -> torch.Tensor:
    """`real_keys` as a (B, 1, L, 1) column of 1.0 (real) and 0.0 (padded), to multiply key features."""
    return real_keys(key_padding_mask, batch, length, device).to(dtype)[:, None, :, None]


def zero_padded(x: torch.Tensor, key_padding_mask: "torch.Tensor | None") -> torch.Tensor:
    """x (B, H, L, D) with the rows of padded keys set to 0."""
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def nonzero(den: torch.Tensor) -> torch.Tensor:
    """A normaliser with exact zeros replaced by 1: a row whose weights sum to 0 (it sees no key) has a zero
    numerator too, so it outputs 0, with finite gradients."""
    return torch.where(den != 0, den, torch.ones_like(den))


def query_positions(lq: int, lk: int, device: "torch.device | str | None") -> torch.Tensor:
    """(Lq,) key position of each query in self patterns, bottom-right aligned: i + Lk - Lq."""
    return torch.arange(lq, device=device) + (lk - lq)


def real_queries(pattern: Pattern, real_k: torch.Tensor, lq: int) -> torch.Tensor:
    """(B, Lq) bool: in self patterns a query is padding iff the key at its position is; cross queries are
    all real."""
    b, lk = real_k.shape
    if pattern.cross:
        return torch.ones(b, lq, dtype=torch.bool, device=real_k.device)
    pos = query_positions(lq, lk, real_k.device)
    inside = (pos >= 0) & (pos < lk)
    return torch.where(inside, real_k[:, pos.clamp(0, lk - 1)], torch.ones_like(inside))
