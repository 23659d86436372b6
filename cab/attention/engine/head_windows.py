"""Head-heterogeneous window/full softmax attention: the shared engine of the head-level mechanisms
(AHA M47, query-adaptive head selection M48, MoA M49, DuoAttention M50).

The configuration is per head h a sliding window `windows[h]` (the half-width w of cab's `local`
convention: NS sees |p - j| <= w, CS sees p - w <= j <= p; None = the head is a full-attention head) and
`sinks` always-visible first keys, plus optionally a per-(batch, head, query) bool `full_rows` that switches
single query rows of window heads to full attention. For every (b, h, i) the row attends, by one softmax:

    full rows / full heads:  every key the pattern and the padding let it see;
    other rows:              the window of its head plus the sinks (intersected with pattern and padding).

A row that sees no key outputs 0. Positions: query i sits at key position i (NS) or i + Lk - Lq (CS,
bottom-right as cab's causal mask).

Efficient path: window heads grouped by window size run cab's `local` torch path (query blocks against
their strided key neighbourhood, O(L (w + s)) per head); full rows are gathered per (batch, head) and scored
against that head's keys in chunks of rows (O(rows x Lk); each chunk checkpointed when gradients are
needed, so training keeps no Lq x Lk probabilities); the two are merged with `torch.where`. The window
output is computed for every row of a window head, also the rows a router switched to full (the bill of a
router: it decides after the cheap local pass). `dense_reference` builds the explicit (B, H, Lq, Lk) mask.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from cab.attention.base import repeat_kv
from cab.attention.engine.prepare import softmax_scale
from cab.attention.local import LocalAttention
from cab.patterns import Pattern, attention_mask

_ROW_CHUNK_ELEMS = 1 << 22  # scores held per chunk of full rows: rows x Lk <= 4M
_CAUSAL_ROWS = 256  # CS: at most this many full rows per chunk


def _local_modules(cache: dict, pattern: Pattern, windows, sinks: int, head_dim: int):
    """{window: (head indices, LocalAttention)} for the window heads (None windows left out)."""
    groups: dict[int, list[int]] = {}
    for h, w in enumerate(windows):
        if w is not None:
            groups.setdefault(int(w), []).append(h)
    out = {}
    for w, heads in groups.items():
        key = (pattern, w, sinks, tuple(heads), head_dim)
        if key not in cache:
            cache[key] = LocalAttention(pattern, len(heads), head_dim, window=w, sinks=sinks)
        out[w] = (heads, cache[key])
    return out


def _rows_mask(windows, full_rows: "torch.Tensor | None", batch: int, lq: int, device) -> torch.Tensor:
    """(B, H, Lq) bool: rows computed by full attention (full heads entirely, plus routed rows)."""
    static = torch.tensor([w is None for w in windows], device=device)
    rows = static[None, :, None].expand(batch, len(windows), lq)
    if full_rows is not None:
        rows = rows | full_rows.to(device=device, dtype=torch.bool)
    return rows


def _full_row_chunks(rows_bh: torch.Tensor, lk: int, offset: int, causal: bool):
    """Yield (row indices, keys scored) chunks of one (batch, head)'s full rows (sorted ascending): at most
    ~4M scores per chunk; under CS at most 256 rows, each chunk scoring only the keys up to its last row's
    position."""
    idx = rows_bh.nonzero().flatten()
    chunk = max(1, _ROW_CHUNK_ELEMS // max(lk, 1))
    if causal:  # short chunks: the keys past a chunk's rows but before its last row stay a thin strip
        chunk = min(chunk, _CAUSAL_ROWS)
    for start in range(0, idx.numel(), chunk):
        sel = idx[start:start + chunk]
        kend = min(lk, max(0, int(sel[-1]) + offset + 1)) if causal else lk
        yield sel, kend


def _attend_rows(q_rows, keys, values, visible, scale):
    """Softmax attention of some query rows over keys with an explicit visibility; empty rows give 0."""
    scores = (q_rows * scale) @ keys.transpose(-1, -2)
    probs = torch.softmax(scores.masked_fill(~visible, torch.finfo(scores.dtype).min), -1)
    return (probs * visible.any(-1, keepdim=True)) @ values


def full_row_outputs(q, k, v, key_padding_mask, pattern: Pattern, rows: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, Dv) with the full-attention output at the rows marked in `rows` (B, H, Lq), 0 elsewhere;
    k, v already expanded to H heads. Any pattern: CS bottom-right causal, the others see every real key."""
    batch, heads, lq, dim = q.shape
    lk = k.shape[-2]
    causal = pattern is Pattern.CS  # CC is query-side causal only: every key is visible to every row
    offset = lk - lq if causal else 0
    scale = softmax_scale(dim)
    key_pos = torch.arange(lk, device=q.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    index, values = [], []
    for b in range(batch):
        ok = None if key_padding_mask is None else ~key_padding_mask[b].bool().to(q.device)
        for h in range(heads):
            for sel, kend in _full_row_chunks(rows[b, h], lk, offset, causal):
                visible = torch.ones(sel.numel(), kend, dtype=torch.bool, device=q.device)
                if causal:
                    visible = key_pos[None, :kend] <= (sel[:, None] + offset)
                if ok is not None:
                    visible = visible & ok[None, :kend]
                args = (q[b, h, sel], k[b, h, :kend], v[b, h, :kend], visible)
                if grad:  # keep no chunk's probabilities for the backward (recomputed there)
                    values.append(checkpoint(_attend_rows, *args, scale, use_reentrant=False))
                else:
                    values.append(_attend_rows(*args, scale))
                index.append(torch.stack([torch.full_like(sel, b), torch.full_like(sel, h), sel]))
    out = q.new_zeros(batch, heads, lq, v.shape[-1])
    if not values:
        return out
    where = torch.cat(index, dim=1)
    return out.index_put((where[0], where[1], where[2]), torch.cat(values))


def full_row_pairs(rows: torch.Tensor, lq: int, lk: int, pattern: Pattern) -> int:
    """Pairs `full_row_outputs` scores for the marked rows (B, H, Lq)."""
    causal = pattern is Pattern.CS
    offset = lk - lq if causal else 0
    return sum(sel.numel() * kend for b in range(rows.shape[0]) for h in range(rows.shape[1])
               for sel, kend in _full_row_chunks(rows[b, h], lk, offset, causal))


def hetero_attention(q, k, v, key_padding_mask, pattern: Pattern, windows, sinks: int,
                     full_rows: "torch.Tensor | None" = None, cache: "dict | None" = None) -> torch.Tensor:
    """The efficient path (see the module docstring); `windows` has one entry per query head."""
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    cache = {} if cache is None else cache
    batch, _, lq, _ = q.shape
    rows = _rows_mask(windows, full_rows, batch, lq, q.device)
    out = q.new_zeros(batch, heads, lq, v.shape[-1])
    for heads_w, module in _local_modules(cache, pattern, windows, sinks, q.shape[-1]).values():
        idx = torch.tensor(heads_w, device=q.device)
        part = module._torch(q[:, idx], k[:, idx], v[:, idx], key_padding_mask)
        out = out.index_copy(1, idx, part) if len(heads_w) < heads else part
    if bool(rows.any()):
        out = torch.where(rows[..., None], full_row_outputs(q, k, v, key_padding_mask, pattern, rows), out)
    return out


def hetero_pairs(q, k, pattern: Pattern, windows, sinks: int, full_rows=None, cache: "dict | None" = None) -> int:
    """(batch, head, query, key) pairs the efficient path scores: `local`'s count for each window head group
    (all its rows), plus Lk per full row."""
    batch, heads, lq, dim = q.shape
    cache = {} if cache is None else cache
    total = 0
    for heads_w, module in _local_modules(cache, pattern, windows, sinks, dim).values():
        qs = q[:, : len(heads_w)]
        total += module.computed_pairs(qs, k[:, :1], k[:, :1])
    rows = _rows_mask(windows, full_rows, batch, lq, q.device)
    return total + full_row_pairs(rows, lq, k.shape[-2], pattern)


def visibility(pattern: Pattern, lq: int, lk: int, key_padding_mask, windows, sinks: int,
               full_rows=None, batch: int = 1, device=None) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: the explicit per-row visibility of the configuration."""
    base = attention_mask(pattern, lq, lk, key_padding_mask, device=device)  # (B|1, 1, Lq, Lk)
    pos = torch.arange(lq, device=device)[:, None] + (lk - lq if pattern.causal else 0)
    key = torch.arange(lk, device=device)[None, :]
    heads = []
    for w in windows:
        if w is None:
            heads.append(torch.ones(lq, lk, dtype=torch.bool, device=device))
        else:
            near = (pos - key).abs() <= w
            heads.append(near | (key < sinks))
    local = torch.stack(heads)[None]  # (1, H, Lq, Lk)
    rows = _rows_mask(windows, full_rows, max(batch, base.shape[0]), lq, device)
    return base & (local | rows[..., None])


def dense_reference(q, k, v, key_padding_mask, pattern: Pattern, windows, sinks: int, full_rows=None):
    """The naive form: explicit mask, one masked softmax over all keys, empty rows zeroed."""
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    mask = visibility(pattern, q.shape[-2], k.shape[-2], key_padding_mask, windows, sinks, full_rows,
                      q.shape[0], q.device)
    scores = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return probs @ v


# per-row windows (MoA's elastic spans: a row's window grows with the keys it can see) ---------------------

def band_chunks(lq: int, lk: int, hw_rows: torch.Tensor, causal: bool, min_rows: int = 128):
    """Yield (first row, stop row, first key, stop key) of the row chunks of one head: each chunk has about
    max(min_rows, widest half-width) rows and scores the contiguous key range its rows' windows cover.
    hw_rows: (Lq,) the head's widest half-width per row over the batch."""
    offset = lk - lq if causal else 0
    start = 0
    while start < lq:
        stop = min(lq, start + max(min_rows, int(hw_rows[start])))
        wmax = int(hw_rows[start:stop].max())
        lo = max(0, start + offset - wmax)
        hi = min(lk, stop - 1 + offset + (0 if causal else wmax) + 1)
        yield start, stop, lo, max(lo, hi)
        start = stop


def banded_attention(q, k, v, key_padding_mask, pattern: Pattern, half_widths: torch.Tensor, sinks: int):
    """Softmax attention where row i of head h sees the keys within `half_widths[b, h, i]` of its position
    (CS: only behind it) plus `sinks` first keys; half_widths (B|1, H|1, Lq) int. Per head, rows in chunks
    of about the head's window: a chunk scores the contiguous key range its windows cover by one matmul
    (no gathered copies; O(Lq x (chunk + span)) per head) and masks it to each row's window."""
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    batch, _, lq, dim = q.shape
    lk = k.shape[-2]
    causal = pattern is Pattern.CS
    offset = lk - lq if causal else 0
    s = min(sinks, lk)
    ok = torch.ones(batch, lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        ok = ~key_padding_mask.bool().to(q.device)
    hw = half_widths.to(q.device).long().expand(batch, heads, lq)
    widest = hw.amax(0).cpu()  # (H, Lq)
    q = q * softmax_scale(dim)
    neg = torch.finfo(q.dtype).min
    key_pos = torch.arange(lk, device=q.device)
    sink_pos = key_pos[:s]
    outs = []
    for h in range(heads):
        parts_h = []
        for r0, r1, lo, hi in band_chunks(lq, lk, widest[h], causal):
            pos = torch.arange(r0, r1, device=q.device) + offset
            kp = key_pos[lo:hi]
            gap = (pos[:, None] - kp[None, :])
            vis = (gap.abs()[None] <= hw[:, h, r0:r1, None]) & ok[:, None, lo:hi] & (kp >= s)[None, None]
            if causal:
                vis = vis & (gap >= 0)[None]
            scores = q[:, h, r0:r1] @ k[:, h, lo:hi].transpose(-1, -2)  # (B, r, hi - lo)
            scores_all, vis_all = scores, vis
            if s:
                sink_vis = ok[:, None, :s] & ((sink_pos[None, :] <= pos[:, None]) if causal else True)
                scores_all = torch.cat([scores, q[:, h, r0:r1] @ k[:, h, :s].transpose(-1, -2)], -1)
                vis_all = torch.cat([vis, sink_vis.expand(batch, r1 - r0, s)], -1)
            probs = torch.softmax(scores_all.masked_fill(~vis_all, neg), -1) * vis_all.any(-1, keepdim=True)
            out = probs[..., : hi - lo] @ v[:, h, lo:hi]
            if s:
                out = out + probs[..., hi - lo:] @ v[:, h, :s]
            parts_h.append(out)
        outs.append(torch.cat(parts_h, 1))
    return torch.stack(outs, 1)


def banded_pairs(batch: int, heads: int, lq: int, half_widths: torch.Tensor, causal: bool, sinks: int,
                 lk: int) -> int:
    """Pairs `banded_attention` scores: every row of a chunk against the chunk's key range, plus the sinks."""
    widest = half_widths.long().expand(batch, heads, lq).amax(0).cpu()
    total = 0
    for h in range(heads):
        for r0, r1, lo, hi in band_chunks(lq, lk, widest[h], causal):
            total += (r1 - r0) * (hi - lo + min(sinks, lk))
    return batch * total


def banded_reference(q, k, v, key_padding_mask, pattern: Pattern, half_widths: torch.Tensor, sinks: int):
    """Explicit (B, H, Lq, Lk) mask of `banded_attention`, one masked softmax."""
    heads = q.shape[1]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    lq, lk = q.shape[-2], k.shape[-2]
    base = attention_mask(pattern, lq, lk, key_padding_mask, device=q.device)
    pos = torch.arange(lq, device=q.device)[:, None] + (lk - lq if pattern.causal else 0)
    key = torch.arange(lk, device=q.device)[None, :]
    near = (pos - key).abs()[None, None] <= half_widths.to(q.device)[..., None]
    mask = base & (near | (key < sinks))
    scores = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), -1)
    return (probs * mask.any(-1, keepdim=True)) @ v
