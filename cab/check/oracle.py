"""Independent references for exact softmax attention: a float64 per-row oracle and plain eager attention.

The oracle walks the query rows one at a time and builds each row's softmax from that row's own visible
keys. It shares no code with the attentions it judges (not even `cab.patterns`' masks), so a bug there
cannot hide in both. `eager_attention` is the usual materialised formula in the caller's dtype: its error
against the oracle is the yardstick for how much numeric error an exact kernel may have.
"""

from __future__ import annotations

from typing import Iterable

import torch

from cab.patterns import Pattern


def _row_visibility(pattern: Pattern, row: int, lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """Bool (Lk,): the keys query `row` may see. Causal self is bottom-right aligned (j <= row + Lk - Lq);
    the other patterns, causal cross included (its causality is on the query side), see every key."""
    keys = torch.arange(lk, device=device)
    if pattern is Pattern.CS:
        return keys <= row + (lk - lq)
    return torch.ones(lk, dtype=torch.bool, device=device)


def _kv_for_query_heads(x: torch.Tensor, query_heads: int) -> torch.Tensor:
    """Key/value heads indexed per query head: query head h uses key/value head h // (Hq / Hkv)."""
    kv_heads = x.shape[1]
    if query_heads % kv_heads:
        raise ValueError(f"query heads ({query_heads}) must be a multiple of key/value heads ({kv_heads})")
    index = torch.arange(query_heads, device=x.device) // (query_heads // kv_heads)
    return x[:, index]


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: "Pattern | str",
    key_padding_mask: "torch.Tensor | None" = None,
    scale: "float | None" = None,
) -> torch.Tensor:
    """Exact softmax attention in float64, one query row at a time (differentiable).

    Shapes follow cab's contract: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), key_padding_mask
    (B, Lk) bool with True = padding. The score scale defaults to 1/sqrt(D). A row that sees no key
    outputs zero. Returns float64 (B, Hq, Lq, Dv)."""
    return oracle_attention_rows(q, k, v, pattern, range(q.shape[-2]), key_padding_mask, scale)


def oracle_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: "Pattern | str",
    rows: "Iterable[int]",
    key_padding_mask: "torch.Tensor | None" = None,
    scale: "float | None" = None,
) -> torch.Tensor:
    """`oracle_attention`'s output rows `rows` only (B, Hq, len(rows), Dv), each against every key it sees:
    what a probe of a long sequence compares a few rows of an exact attention with."""
    pattern = Pattern.parse(pattern)
    q, k, v = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    batch, heads, lq, dim = q.shape
    lk = k.shape[-2]
    k, v = _kv_for_query_heads(k, heads), _kv_for_query_heads(v, heads)
    scale = dim ** -0.5 if scale is None else scale
    real_keys = None if key_padding_mask is None else ~key_padding_mask.to(device=q.device, dtype=torch.bool)
    out = []
    for i in rows:
        visible = _row_visibility(pattern, i, lq, lk, q.device).expand(batch, lk)
        if real_keys is not None:
            visible = visible & real_keys
        visible = visible[:, None, :]  # (B, 1, Lk), broadcast over heads
        scores = (k @ q[:, :, i, :, None]).squeeze(-1) * scale  # (B, H, Lk)
        scores = scores.masked_fill(~visible, float("-inf"))
        top = scores.amax(dim=-1, keepdim=True).detach()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row with no visible key
        weights = torch.exp(scores - top)  # exactly 0 where masked
        total = weights.sum(dim=-1, keepdim=True)  # (B, H, 1)
        row = (weights[:, :, None, :] @ v).squeeze(-2) / total.clamp_min(torch.finfo(torch.float64).tiny)
        out.append(torch.where(total > 0, row, torch.zeros_like(row)))
    if not out:
        return q.new_zeros(batch, heads, 0, v.shape[-1])
    return torch.stack(out, dim=2)


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: "Pattern | str",
    key_padding_mask: "torch.Tensor | None" = None,
    scale: "float | None" = None,
) -> torch.Tensor:
    """Plain eager attention in the inputs' dtype: softmax(QK^T * scale + mask) V, fully materialised.

    This is the numeric baseline an exact kernel is held to (its error against the float64 oracle)."""
    pattern = Pattern.parse(pattern)
    batch, heads, lq, dim = q.shape
    lk = k.shape[-2]
    k, v = _kv_for_query_heads(k, heads), _kv_for_query_heads(v, heads)
    scale = dim ** -0.5 if scale is None else scale
    visible = torch.stack([_row_visibility(pattern, i, lq, lk, q.device) for i in range(lq)])[None, None]
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    seen = visible.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1)
    return torch.where(seen, probs @ v, torch.zeros((), dtype=q.dtype, device=q.device))


def eager_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: "Pattern | str",
                         rows: "list[int]", scale: "float | None" = None) -> torch.Tensor:
    """`eager_attention`'s output rows `rows` in the inputs' dtype (no padding): the numeric yardstick for a
    probe's sampled rows."""
    pattern = Pattern.parse(pattern)
    heads, lq, dim = q.shape[1], q.shape[-2], q.shape[-1]
    lk = k.shape[-2]
    k, v = _kv_for_query_heads(k, heads), _kv_for_query_heads(v, heads)
    scale = dim ** -0.5 if scale is None else scale
    visible = torch.stack([_row_visibility(pattern, i, lq, lk, q.device) for i in rows])[None, None]
    scores = (q[..., rows, :] @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return probs @ v
