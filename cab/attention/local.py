"""Sliding-window (local) softmax attention with optional attention-sink tokens, computed in query
blocks against their key neighbourhood: O(L (w + s)) time and memory, no L x L tensor."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.functional import softmax_scale
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("a sliding window needs queries and keys on one position axis; two different sequences share "
          "no positions, so any alignment would be an arbitrary choice rather than local attention")


def _block_size(window: int) -> int:
    """Queries per block: about the window, so a block's key neighbourhood is ~3x (NS) / 2x (CS) its
    rows; at least 16 rows to keep the batched matmuls reasonably sized."""
    return max(16, window)


@register_attention(
    "local", patterns=("NS", "CS"), family="local", exact=False, mechanism="M29",
    citation="Luong et al., Effective Approaches to Attention-based Neural Machine Translation, EMNLP 2015; "
    "sinks: Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class LocalAttention(Attention):
    """Softmax attention restricted to a sliding window of half-width `window` (w), plus `sinks` (s)
    always-visible first keys.

    Convention: query at position p sees keys j with |p - j| <= w in NS (2w+1 keys) and p - w <= j <= p
    in CS (w+1 keys including itself) — the causal window is the left half of the noncausal one; CAB's
    causal window held w keys (p-w+1..p), one fewer. Sink keys 0..s-1 are visible to every query (in CS
    only to queries at or after them). Visibility is (window OR sink) AND NOT padding: a padded key is
    never seen, and a row with no visible key outputs 0 (CAB combined the padding and window masks with
    the wrong operator). Positions: query i sits at position i in NS and at i + Lk - Lq in CS (bottom-right,
    as cab's causal mask). NC/CC are unsupported (see the reasons). Scores are scaled by 1/sqrt(d).

    Efficient path: queries in blocks of b rows; each block scores the b + 2w (CS: b + w) keys around it
    plus the s sinks, masked to the exact window, in one softmax. The key windows of all blocks are one
    overlapping strided view of a padded copy of the keys, so two batched matmuls do the work without a
    copy per window.
    """

    def __init__(self, pattern, num_heads, head_dim, window: int = 15, sinks: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if window < 0 or sinks < 0:
            raise ValueError(f"window and sinks must be >= 0, got window={window}, sinks={sinks}")
        self.window = window
        self.sinks = sinks

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, sinks={self.sinks}"

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        batch, heads, lq, dim = q.shape
        lk = k.shape[-2]
        causal = self.pattern is Pattern.CS
        w, block = self.window, _block_size(self.window)
        ahead = 0 if causal else w
        span = block + w + ahead  # keys scored by one query block
        offset = lk - lq if causal else 0  # query i sits at key position i + offset
        blocks = -(-lq // block) + -(-(w + ahead) // block)  # per head, enough to hold every window
        slab = blocks * block  # rows per head; row r holds the key at position offset - w + r
        start = offset - w
        lo, hi = max(0, -start), max(0, min(slab, lk - start))  # slab rows that hold real positions

        # Every head's slab laid end to end (plus `span` spare rows), so that the key windows of all
        # blocks of all heads are one strided view with a single batch stride: no copy per window. The
        # last windows of a head run into the next head's slab; they belong to query rows past the end
        # and are discarded.
        n = batch * heads * blocks
        windows = []
        for x in (k, v):
            flat = x.new_zeros(batch * heads * slab + span, x.shape[-1])
            flat[: batch * heads * slab].view(batch, heads, slab, -1)[:, :, lo:hi] = x[:, :, start + lo:start + hi]
            windows.append(flat.as_strided((n, span, x.shape[-1]), (block * x.shape[-1], x.shape[-1], 1)))
        k_win, v_win = windows
        key_ok = torch.ones(1, lk, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            key_ok = ~key_padding_mask.bool()
        ok = torch.zeros(key_ok.shape[0], slab + span, dtype=torch.bool, device=q.device)
        ok[:, lo:hi] = key_ok[:, start + lo:start + hi]
        ok_win = ok.unfold(-1, span, block)[:, :blocks]  # (B', blocks, span)
        rows = torch.arange(block, device=q.device).unsqueeze(1)
        cols = torch.arange(span, device=q.device).unsqueeze(0)
        in_window = (cols >= rows) & (cols <= rows + w + ahead)  # (block, span)
        visible = in_window & ok_win[:, None, :, None, :]  # (B', 1, blocks, block, span)

        q_rows = q.new_zeros(batch, heads, slab, dim)
        q_rows[:, :, :lq] = q * softmax_scale(dim)
        scores = torch.bmm(q_rows.reshape(n, block, dim), k_win.transpose(-1, -2))
        scores = scores.view(batch, heads, blocks, block, span)
        s = min(self.sinks, lk)
        if s:
            position = (torch.arange(slab, device=q.device) + offset).reshape(blocks, block, 1)
            gap = position - torch.arange(s, device=q.device)  # query position minus sink position
            outside = (gap > w) if causal else (gap.abs() > w)  # not already in the window (CS: and past)
            sink_visible = outside & key_ok[:, None, None, :s]  # (B', blocks, block, s)
            sink_scores = (q_rows @ k[..., :s, :].transpose(-1, -2)).view(batch, heads, blocks, block, s)
            scores = torch.cat([sink_scores, scores], dim=-1)
            visible = torch.cat([sink_visible.unsqueeze(1), visible], dim=-1)
        probs = torch.softmax(scores.masked_fill(~visible, torch.finfo(scores.dtype).min), dim=-1)
        seen = visible.any(dim=-1, keepdim=True)
        if not bool(seen.all()):
            probs = probs * seen  # rows with no visible key output 0
        out = torch.bmm(probs[..., s:].reshape(n, block, span), v_win).view(batch, heads, slab, -1)
        if s:
            out = out + probs[..., :s].reshape(batch, heads, slab, s) @ v[..., :s, :]
        return out[:, :, :lq]

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row: gather the visible key indices (window, sinks, minus padding), softmax over them."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        batch, heads, lq, dim = q.shape
        lk = k.shape[-2]
        causal = self.pattern is Pattern.CS
        out = q.new_zeros(batch, heads, lq, v.shape[-1])
        for b in range(batch):
            for i in range(lq):
                p = i + (lk - lq if causal else 0)
                keys = set(range(max(0, p - self.window), min(lk, p + (0 if causal else self.window) + 1)))
                keys |= {j for j in range(min(self.sinks, lk)) if not causal or j <= p}
                if key_padding_mask is not None:
                    keys = {j for j in keys if not bool(key_padding_mask[b, j])}
                if keys:
                    idx = torch.tensor(sorted(keys), device=q.device)
                    weights = torch.softmax((q[b, :, i : i + 1] @ k[b][:, idx].transpose(-1, -2)) / dim**0.5, -1)
                    out[b, :, i] = (weights @ v[b][:, idx]).squeeze(-2)
        return out
