"""The negative control of the task boards: an attention that mixes no information between positions.

A task board measures attention only when exact attention beats this control beyond the seed intervals
(`cab.report.leaderboard`): where it does not, the backbone (embeddings, feed-forward layers, the other
slots) solves the task, or nothing does, and the board says nothing about the attention in the tested slots.
"""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import compute_dtype, nonzero, query_positions, real_keys
from cab.registry import register_attention


@register_attention(
    "no_mixing", patterns=("NS", "CS", "NC", "CC"), family="control", exact=False,
    citation="cab's negative control for task boards (no token mixing)",
    description="Negative control: each query returns the value at its own position (self patterns) or the "
    "uniform average of the memory's real values (cross patterns); queries and keys are ignored.",
)
class NoMixingAttention(Attention):
    """Negative control: nothing is mixed by content, and nothing at all in the self patterns.

    Self patterns (NS, CS): query i returns the value at its own key position i + Lk - Lq (bottom-right
    aligned, as everywhere in cab), so no information moves between positions; this is causal by
    construction. A query whose own key is padding, or that has no key position (Lq > Lk), sees no key and
    outputs zeros. Cross patterns (NC, CC): every query returns the uniform average of the memory's real
    (unpadded) values, the one summary a query-independent attention can give without position knowledge;
    it is query-side causal (CC: all keys visible, no row reads another query) by construction. A memory
    that is all padding gives zeros. Queries and keys are never read, so no gradient reaches them.

    Decoding is not provided: a causal self step would hold no state at all (0 bytes), and a causal cross
    step only the memory's mean; neither is a decode cost worth timing."""

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        b, hq, lq, _ = q.shape
        lk = k.shape[-2]
        if hq % k.shape[1]:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]})")
        real = real_keys(key_padding_mask, b, lk, v.device)  # (B, Lk)
        if self.cross:
            # mean over the real keys per key/value head, then shared by its query heads
            dtype = compute_dtype(v.dtype)
            total = v.masked_fill(~real[:, None, :, None], 0.0).to(dtype).sum(dim=-2, keepdim=True)
            count = real.sum(dim=-1).to(dtype)[:, None, None, None]
            mean = (total / nonzero(count)).to(v.dtype)
            return repeat_kv(mean, hq).expand(b, hq, lq, v.shape[-1]).contiguous()
        if lk == 0:  # no key position at all: every row sees no key
            return v.new_zeros(b, hq, lq, v.shape[-1])
        position = query_positions(lq, lk, v.device)  # (Lq,) own key position, negative when Lq > Lk
        inside = position >= 0
        index = position.clamp(min=0)
        own = repeat_kv(v, hq)[:, :, index]  # (B, Hq, Lq, Dv)
        keep = inside[None, :] & real[:, index]  # (B, Lq): the query has an own key and it is real
        return own.masked_fill(~keep[:, None, :, None], 0.0)

    def reference(self, q, k, v, key_padding_mask=None):
        """The same rule as an explicit (Lq, Lk) weight matrix: self patterns, 1 at the query's own key
        position when that key is real; cross patterns, 1 / (number of real keys) at every real key."""
        lq, lk = q.shape[-2], k.shape[-2]
        v = repeat_kv(v, q.shape[1])
        real = real_keys(key_padding_mask, q.shape[0], lk, v.device)[:, None, None, :]  # (B, 1, 1, Lk)
        if self.cross:
            weights = real.to(v.dtype).expand(-1, -1, lq, -1)
            weights = weights / nonzero(weights.sum(dim=-1, keepdim=True))
        else:
            rows = torch.arange(lq, device=v.device)[:, None] + (lk - lq)
            cols = torch.arange(lk, device=v.device)[None, :]
            weights = ((rows == cols)[None, None] & real).to(v.dtype)
        return weights @ v
