"""Helpers shared by the content-based sparse attentions (biformer, sea, hip, landmark, ...): the layout of
real keys and query positions, block pooling, top-k block selection with validity, the gathered sparse
softmax that runs a selection without any L x L tensor, and the dense masked softmax their references use.

Conventions: q (B, H, Lq, D) and k, v (B, H, Lk, D) with k, v already expanded to the query heads; a
selection is a tensor of key indices `idx` (B, H, G, N) per query group (G groups of gq consecutive queries,
gq = 1 for per-query selections) and a bool `valid` broadcastable to (B, H, G, gq, N); invalid slots are
ignored (their index may be anything in [0, Lk)). Indices of one row must be distinct.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from cab.attention.engine.scores import masked_softmax_rows

_MASK32 = 0xFFFFFFFF
_GATHER_ELEMENTS = 1 << 24  # gathered key elements held at once by gathered_attention


def pool_blocks(x: torch.Tensor, real: torch.Tensor, block: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """Mean of x (B, H, L, D) over the real rows (real (B, L)) of each block of `block` consecutive rows:
    ((B, H, nb, D), counts (B, nb)); a block with no real row has mean 0 and count 0."""
    b, h, length, d = x.shape
    nb = -(-length // block)
    pad = nb * block - length
    w = real.to(x.dtype)
    xs = torch.nn.functional.pad(x * w[:, None, :, None], (0, 0, 0, pad)).reshape(b, h, nb, block, d).sum(-2)
    counts = torch.nn.functional.pad(real.long(), (0, pad)).reshape(b, nb, block).sum(-1)
    return xs / counts.clamp_min(1).to(x.dtype)[:, None, :, None], counts


def topk_valid(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """The top-k entries of `scores` (..., n) among the `allowed` ones: (index (..., k'), valid (..., k')),
    k' = min(k, n); slots beyond the number of allowed entries are invalid. Ties go to the lower index."""
    n = scores.shape[-1]
    kk = min(k, n)
    masked = scores.masked_fill(~allowed, float("-inf"))
    # a stable descending sort breaks ties by index (topk's tie order is unspecified)
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :kk]
    valid = allowed.gather(-1, order)
    return order, valid


def block_tokens(blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Token indices (..., nsel * block) of the selected blocks (..., nsel)."""
    offs = torch.arange(block, device=blocks.device)
    return (blocks[..., None] * block + offs).flatten(-2)


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                       scale: float, return_lse: bool = False):
    """Softmax attention of grouped queries over their selected keys, chunked over the groups so that at
    most ~2^24 gathered key elements are held at once.

    q (B, H, G, gq, D); k (B, H, Lk, D), v (B, H, Lk, Dv); idx (B, H, G, N) int64 in [0, Lk); valid bool
    broadcastable to (B, H, G, gq, N). Returns (B, H, G, gq, Dv), rows with no valid key 0 (and with
    return_lse the (B, H, G, gq) log-sum-exp of the scaled scores, -inf for such rows). With autograd on, each
    chunk is checkpointed: backward gathers its keys again, so memory stays at one chunk's gather.

    A selection of N >= Lk slots per row (short sequences, or a top-k wider than the keys) is run as a dense
    masked softmax over all Lk keys instead: the same keys and weights (indices are distinct), without
    gathering a copy of the keys per query."""
    b, h, g, gq, d = q.shape
    n = idx.shape[-1]
    lk, dv = k.shape[-2], v.shape[-1]
    valid = valid.expand(b, h, g, gq, n)
    kf = k.reshape(b * h * lk, d)
    vf = v.reshape(b * h * lk, dv)
    base = (torch.arange(b * h, device=q.device) * lk).reshape(b, h, 1, 1)
    flat = idx.clamp(0, max(lk - 1, 0)) + base
    dense = n >= lk
    chunk = _dense_chunk if dense else _gathered_chunk
    step = max(1, _GATHER_ELEMENTS // max(1, b * h * max(n, 1) * max(d, dv)))
    outs, lses = [], []
    checkpointed = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    for g0 in range(0, g, step):
        sl = slice(g0, g0 + step)
        if dense:
            args = (q[:, :, sl], k, v, _selected(idx[:, :, sl], valid[:, :, sl], lk))
        else:
            args = (q[:, :, sl], kf, vf, flat[:, :, sl], valid[:, :, sl])
        if checkpointed:  # keep only the chunk's inputs for backward, not its gathered keys and values
            out, lse = checkpoint(chunk, *args, scale, use_reentrant=False)
        else:
            out, lse = chunk(*args, scale)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2)
    if return_lse:
        return out, torch.cat(lses, dim=2)
    return out


def _selected(idx: torch.Tensor, valid: torch.Tensor, lk: int) -> torch.Tensor:
    """The selection of idx (B, H, c, N) / valid (B, H, c, gq, N) as a (B, H, c, gq, Lk) bool key mask."""
    b, h, c, gq, n = valid.shape
    target = torch.where(valid, idx[:, :, :, None, :].expand(b, h, c, gq, n), lk)
    mask = torch.zeros(b, h, c, gq, lk + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, target, True)[..., :lk]


def _dense_chunk(q, k, v, ok, scale):
    """One chunk of gathered_attention as a masked softmax over every key: ok (B, H, c, gq, Lk)."""
    s = (q * scale) @ k[:, :, None].transpose(-1, -2)  # (B, H, c, gq, Lk)
    return masked_softmax_rows(s, ok, v[:, :, None])


def _gathered_chunk(q, kf, vf, flat, ok, scale):
    """One chunk of gathered_attention: (out (B, H, c, gq, Dv), lse (B, H, c, gq))."""
    b, h, c, n = flat.shape
    kg = kf.index_select(0, flat.reshape(-1)).reshape(b, h, c, n, kf.shape[-1])
    vg = vf.index_select(0, flat.reshape(-1)).reshape(b, h, c, n, vf.shape[-1])
    s = (q * scale) @ kg.transpose(-1, -2)  # (B, H, c, gq, N)
    return masked_softmax_rows(s, ok, vg)


def selection_mask(idx: torch.Tensor, valid: torch.Tensor, group: int, lq: int, lk: int) -> torch.Tensor:
    """The dense (B, H, Lq, Lk) bool mask of a grouped selection (see gathered_attention)."""
    b, h, g, n = idx.shape
    valid = valid.expand(b, h, g, group, n)
    mask = torch.zeros(b, h, g, group, lk + 1, dtype=torch.bool, device=idx.device)
    target = torch.where(valid, idx[:, :, :, None, :].expand(b, h, g, group, n), lk)
    mask.scatter_(-1, target, True)
    return mask[..., :lk].reshape(b, h, g * group, lk)[:, :, :lq]


def selection_count(valid: torch.Tensor, group: int, lq: int) -> int:
    """Number of (batch, head, query, key) pairs of a grouped selection (indices distinct per row) without
    forming its dense mask: valid (B, H, G, 1 or group, N); rows past lq in the last group are not counted."""
    g = valid.shape[2]
    rows = (lq - torch.arange(g, device=valid.device) * group).clamp(0, group)  # real rows per group
    if valid.shape[3] == 1:
        return int((valid[:, :, :, 0].sum(-1) * rows).sum())
    inside = torch.arange(group, device=valid.device)[None, :] < rows[:, None]  # (G, group)
    return int((valid & inside[None, None, :, :, None]).sum())


def group_queries(q: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, Lq, D) -> (B, H, ceil(Lq / group), group, D), zero rows appended."""
    b, h, lq, d = q.shape
    g = -(-lq // group)
    return torch.nn.functional.pad(q, (0, 0, 0, g * group - lq)).reshape(b, h, g, group, d)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def log2_ceil(n: int) -> int:
    return max(0, math.ceil(math.log2(max(1, n))))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), split in 16-bit halves so nothing overflows int64."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (C. Wellons' lowbias32) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_ranks(seed: int, rows: torch.Tensor, samples: int, counts: torch.Tensor) -> torch.Tensor:
    """(B, Lq, samples) int64: for query row i and sample s, a key rank uniform in [0, counts[b, i]).

    A counter-based hash of (seed, i, s), so the sample of a row depends on nothing but the seed, the row
    index and how many keys it may see: appending padding or removing later rows leaves it unchanged."""
    row_hash = _mix32(_mix32(torch.full_like(rows, (seed & _MASK32) ^ 0x9E3779B9)) ^ rows)
    draws = torch.arange(samples, device=rows.device, dtype=torch.int64)
    hashed = _mix32(row_hash[:, None] ^ _mix32(draws + 0x7F4A7C15)[None, :])  # (Lq, S)
    return hashed[None] % counts.clamp_min(1)[..., None]
