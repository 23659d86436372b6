"""Sliding-window (local) softmax attention with optional attention-sink tokens, computed in query
blocks against their key neighbourhood: O(L (w + s)) time and memory, no L x L tensor."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine import blocksparse as bs
from cab.attention.engine.masks import aligned, key_prefix, or_masks, query_offset, sliding_window
from cab.attention.engine.prepare import softmax_scale
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

    `backend="flex"`: the same window and sinks as a FlexAttention mask_mod over a BlockMask listing, per 128
    query rows, the key blocks of the window interval and the sink block(s) (cab's `engine.blocksparse` engine);
    on CPU its backward is autograd through the torch path (FlexAttention has no CPU backward).
    `computed_pairs` counts the scored (query, key) pairs of the running backend, `algorithmic_flops` the
    torch path's matmuls.
    """

    def __init__(self, pattern, num_heads, head_dim, window: int = 15, sinks: int = 0, backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        if window < 0 or sinks < 0:
            raise ValueError(f"window and sinks must be >= 0, got window={window}, sinks={sinks}")
        if backend not in bs.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(bs.BACKENDS)}, got {backend!r}")
        self.window = window
        self.sinks = sinks
        self.backend = backend
        self.compiles_per_shape = backend == "flex"
        self._flex_masks: dict = {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, sinks={self.sinks}, backend={self.backend}"

    # the pattern as an element mask and a block list (FlexAttention path, counts) ---------------------------

    def mask_fn(self, lq: int, lk: int):
        """visible(b, h, i, j) of the window and the sinks (no padding), as index-tensor ops (a mask_mod)."""
        return aligned(self.pattern, lq, lk, or_masks(sliding_window(self.window), key_prefix(self.sinks)))

    def block_layout(self, lq: int, lk: int, block: int) -> "bs.Layout":
        """Key blocks per query block of `block` rows: the window's interval plus the sink keys."""
        causal = self.pattern is Pattern.CS
        p = torch.arange(lq) + query_offset(self.pattern, lq, lk)
        zero = torch.zeros_like(p)
        hi = p if causal else p + self.window
        return bs.layout_from_boxes([(zero, zero, p - self.window, hi)], max(lk, 1), block, block, lq, lk,
                                    extra_keys=self.sinks)

    def _flex(self, q, k, v, key_padding_mask):
        reason = bs.flex_unavailable_reason(q.device)
        if reason:
            raise RuntimeError(f"local: backend='flex' is unavailable here: {reason}")
        from cab.attention.flash import flex_call

        batch, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
        pad_key = None if key_padding_mask is None else key_padding_mask.cpu().numpy().tobytes()
        key = (batch, lq, lk, str(q.device), pad_key)
        if key not in self._flex_masks:
            if len(self._flex_masks) >= 8:
                self._flex_masks.pop(next(iter(self._flex_masks)))
            self._flex_masks[key] = bs.flex_block_mask(self.block_layout(lq, lk, bs.FLEX_BLOCK), self.mask_fn(lq, lk),
                                                       batch, self.num_heads, key_padding_mask, q.device)
        block_mask = self._flex_masks[key]

        def run_flex(q_, k_, v_):
            return flex_call(q_, k_, v_, block_mask)

        return bs.flex_with_fallback_backward(q, k, v, run_flex,
                                              lambda a, b, c: self._torch(a, b, c, key_padding_mask))

    def _window_for(self, lq: int, lk: int) -> int:
        """The window the torch path scores: no query is farther than max(lq, lk) - 1 from any key, so a
        wider window sees exactly the same keys (a window of 256 at 64 tokens would score 8x the rows)."""
        return min(self.window, max(lq, lk, 1) - 1)

    def _geometry(self, lq: int, lk: int) -> "tuple[int, int, int, int]":
        """(block, blocks, span, sinks scored) of the torch path for this shape."""
        w = self._window_for(lq, lk)
        block = _block_size(w)
        ahead = 0 if self.pattern is Pattern.CS else w
        blocks = -(-lq // block) + -(-(w + ahead) // block)
        return block, blocks, block + w + ahead, min(self.sinks, lk)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """The torch path's matmul FLOPs: every slab row against its span of keys plus the sinks (padded slab
        rows and out-of-range window rows included, as the batched matmuls compute them); None for flex."""
        if self.backend != "torch":
            return None
        block, blocks, span, s = self._geometry(lq, lk)
        return 2 * batch * self.num_heads * blocks * block * (span + s) * (2 * self.head_dim)

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """(batch, head, real query, real key) pairs scored. torch: each real query row against the real keys
        in its block's window span plus the sinks (masked entries inside the span count, as they are
        computed); flex: the pairs inside FlexAttention's listed 128 x 128 blocks."""
        batch, heads, lq = q.shape[0], q.shape[1], q.shape[-2]
        lk = k.shape[-2]
        if self.backend == "flex":
            return bs.layout_pairs(self.block_layout(lq, lk, bs.FLEX_BLOCK), batch, heads)
        block, blocks, span, s = self._geometry(lq, lk)
        offset = query_offset(self.pattern, lq, lk)
        # key position of each span's first row
        first = torch.arange(blocks) * block + offset - self._window_for(lq, lk)
        keys = (torch.minimum(first + span, torch.tensor(lk)) - first.clamp(min=0)).clamp(min=0)
        rows = (lq - torch.arange(blocks) * block).clamp(0, block)
        return batch * heads * int((rows * (keys + s)).sum())

    def forward(self, q, k, v, key_padding_mask=None):
        if self.backend == "flex":
            return self._flex(q, k, v, key_padding_mask)
        return self._torch(q, k, v, key_padding_mask)

    def _torch(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        batch, heads, lq, dim = q.shape
        lk = k.shape[-2]
        causal = self.pattern is Pattern.CS
        w = self._window_for(lq, lk)
        block = _block_size(w)
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
