"""Tensor helpers shared by the attention modules: masking, dtypes, and the linear-attention primitives
(noncausal and chunked causal feature-map attention) that kernel-based mechanisms build on."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def _nonzero(den: torch.Tensor) -> torch.Tensor:
    """A normaliser with zeros replaced by 1: a row whose non-negative weights sum to 0 has a zero
    numerator too, so it outputs 0 (with finite gradients)."""
    return torch.where(den > 0, den, torch.ones_like(den))


def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Noncausal feature-map attention phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1), in O(L m d).

    phi_q (B, H, Lq, m), phi_k (B, H, Lk, m) non-negative (padded keys already zero), v (B, H, Lk, Dv).
    The normaliser divides whichever is narrower, the features or the output.
    """
    kv = phi_k.transpose(-1, -2) @ v
    inverse = 1.0 / _nonzero(phi_q @ phi_k.sum(dim=-2).unsqueeze(-1))
    if phi_q.shape[-1] <= v.shape[-1]:
        return (phi_q * inverse) @ kv
    return (phi_q @ kv) * inverse


def causal_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """Causal feature-map attention: row t uses keys 0..t (Lq == Lk), computed in chunks.

    Within a chunk the (C x C) lower-triangular weight block is explicit; across chunks the prefix sums
    of phi(k) v^T and phi(k) come from an exclusive cumulative sum over per-chunk states, so time is
    O(L (C + m) d) and memory O(L m d / C), with no L x L tensor.
    """
    b, h, length, m = phi_q.shape
    dv = v.shape[-1]
    pad = (-length) % chunk_size
    if pad:
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    n = (length + pad) // chunk_size
    qc = phi_q.reshape(b, h, n, chunk_size, m)
    kc = phi_k.reshape(b, h, n, chunk_size, m)
    vc = v.reshape(b, h, n, chunk_size, dv)
    # per-chunk states and their exclusive prefix sums (the state entering each chunk)
    kv_state = kc.transpose(-1, -2) @ vc  # (B, H, N, m, Dv)
    k_state = kc.sum(dim=-2)  # (B, H, N, m)
    kv_prev = F.pad(kv_state.cumsum(dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    k_prev = F.pad(k_state.cumsum(dim=2)[:, :, :-1], (0, 0, 1, 0))
    tril = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=phi_q.device).tril()
    weights = (qc @ kc.transpose(-1, -2)).masked_fill(~tril, 0.0)  # (B, H, N, C, C)
    num = qc @ kv_prev + weights @ vc
    den = (qc @ k_prev.unsqueeze(-1)) + weights.sum(dim=-1, keepdim=True)
    out = (num / _nonzero(den)).reshape(b, h, n * chunk_size, dv)
    return out[:, :, :length]
