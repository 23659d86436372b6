"""Attention over selected key blocks without copying a block's keys per query (landmark, BiFormer's causal
routing): the queries that selected a block run as one matmul against that block's keys, and a row's own
block runs as a blocked matmul; the per-block results merge in one softmax per row."""

from __future__ import annotations

import torch


def key_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (B, L) or (B, H, L, ...) cut into blocks along L: (B, [H,] ceil(L / block), block, ...), zeros (False)
    appended."""
    axis = 1 if x.dim() == 2 else 2
    length = x.shape[axis]
    nb = -(-length // block)
    pad = [0, 0] * (x.dim() - axis - 1) + [0, nb * block - length]
    return torch.nn.functional.pad(x, pad).unflatten(axis, (nb, block))


def block_pairs(qs: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, tok_ok: torch.Tensor, blocks: torch.Tensor,
                ok: torch.Tensor, with_lse: bool) -> "tuple[torch.Tensor | None, torch.Tensor]":
    """For every valid (query, selected block) pair: the softmax-weighted value of the block's real tokens for
    the query and (with_lse) the log-sum-exp of those scores. The queries that selected a block are gathered and
    run as one matmul per block (batched over heads, padded to the most queries of a head), so no block's keys
    are copied per query. qs (B, H, n, D) scaled queries; kb (B, H, nb, bs, D), vb (B, H, nb, bs, Dv) and tok_ok
    (B, nb, bs) from key_blocks; blocks, ok (B, H, n, k), a selected block holding at least one real token.
    Returns lse (B, H, n, k), -inf at invalid pairs (None without with_lse), and values (B, H, n, k, Dv), 0 at
    invalid pairs."""
    b, h, n, kk = blocks.shape
    nb, bs, d, dv = kb.shape[2], kb.shape[3], qs.shape[-1], vb.shape[-1]
    heads, dev = b * h, qs.device
    with torch.no_grad():
        pair = ok.reshape(-1).nonzero()[:, 0]  # flat (b, h, row, slot) index of each valid pair
        head = torch.div(pair, n * kk, rounding_mode="floor")
        segment = blocks.reshape(-1)[pair] * heads + head  # pairs grouped by block, then head
        order = torch.argsort(segment, stable=True)
        pair, segment = pair[order], segment[order]
        counts = torch.bincount(segment, minlength=nb * heads)
        widths = counts.reshape(nb, heads).amax(1)  # padded queries per head for each block
        offsets = torch.cumsum(widths * heads, 0) - widths * heads
        rank = torch.arange(pair.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[segment]
        block = torch.div(segment, heads, rounding_mode="floor")
        slot = offsets[block] + (segment - block * heads) * widths[block] + rank  # row in the padded layout
        total = int((widths * heads).sum())
        # padded rows read a zero query row; invalid pairs read a last, empty output row
        source = torch.full((total,), heads * n, dtype=torch.long, device=dev)
        source[slot] = torch.div(pair, kk, rounding_mode="floor")
        target = torch.full((heads * n * kk,), total, dtype=torch.long, device=dev)
        target[pair] = slot
        tok = tok_ok[:, None].expand(b, h, nb, bs).flatten(0, 1)
        hidden = ~(tok | ~tok.any(-1, keepdim=True))  # padding rows of a block without real tokens stay finite
    widths = widths.tolist()
    # split / unbind rather than slices: their backward assembles one gradient instead of one per block
    q_pads = torch.cat([qs.reshape(-1, d), qs.new_zeros(1, d)]).index_select(0, source).split(
        [w * heads for w in widths])
    lses, outs = [], []
    for c, (qc, kc, vc) in enumerate(zip(q_pads, kb.flatten(0, 1).unbind(1), vb.flatten(0, 1).unbind(1))):
        if widths[c]:
            s = qc.reshape(heads, widths[c], d) @ kc.transpose(-1, -2)
            s = s.masked_fill(hidden[:, c, None], float("-inf"))
            if with_lse:
                lses.append(torch.logsumexp(s, -1).reshape(-1))
            outs.append((torch.softmax(s, -1) @ vc).reshape(-1, dv))
    out = torch.cat(outs + [qs.new_zeros(1, dv)]).index_select(0, target).reshape(b, h, n, kk, dv)
    if not with_lse:
        return None, out
    lse = torch.cat(lses + [qs.new_full((1,), float("-inf"))]).index_select(0, target)
    return lse.reshape(b, h, n, kk), out


def own_block_scores(qs: torch.Tensor, kb: torch.Tensor, tok_ok: torch.Tensor, lk: int, causal: bool) -> torch.Tensor:
    """Scores (B, H, Lq, bs) of each scaled query against the tokens of its own block (query i at key position
    p = i + Lk - Lq), -inf at padded tokens, past Lk, after p (causal) and for p < 0: a blocked matmul of
    each block's queries with its keys."""
    b, h, lq, _ = qs.shape
    nb, bs = kb.shape[2], kb.shape[3]
    before = max(lq - lk, 0)  # rows before every key
    qpos = key_blocks(torch.nn.functional.pad(qs[:, :, before:], (0, 0, max(lk - lq, 0), 0)), bs)
    s = (qpos @ kb.transpose(-1, -2)).flatten(2, 3)[:, :, max(lk - lq, 0): lk]  # (B, H, Lq - before, bs)
    ok = tok_ok[:, :, None, :].expand(b, nb, bs, bs)
    if causal:
        ok = ok & torch.ones(bs, bs, dtype=torch.bool, device=qs.device).tril()
    ok = ok.flatten(1, 2)[:, max(lk - lq, 0): lk]
    s = s.masked_fill(~ok[:, None], float("-inf"))
    return torch.nn.functional.pad(s, (0, 0, before, 0), value=float("-inf"))


def grouped_softmax(own: "torch.Tensor | None", vb: torch.Tensor, logits: torch.Tensor, values: torch.Tensor,
                    lk: int) -> torch.Tensor:
    """One softmax per row over its own block's token scores `own` (B, H, Lq, bs) (or none) and the `logits`
    (B, H, Lq, k) of entries standing for the `values` (B, H, Lq, k, Dv); rows with no finite score give 0.
    The own tokens' values come from vb (B, H, nb, bs, Dv) by a blocked matmul."""
    z = logits if own is None else torch.cat([own, logits], dim=-1)
    mx = z.amax(-1, keepdim=True)
    empty = torch.isinf(mx)
    w = torch.exp(z - torch.where(empty, torch.zeros_like(mx), mx))
    w = w / torch.where(empty, torch.ones_like(mx), w.sum(-1, keepdim=True))
    if own is None:
        return (w[..., None] * values).sum(-2)
    bs = own.shape[-1]
    out = (w[..., bs:, None] * values).sum(-2)  # a product and sum: a batched (1, k) @ (k, Dv) matmul is slower
    lq = w.shape[-2]
    before = max(lq - lk, 0)
    wpos = key_blocks(torch.nn.functional.pad(w[:, :, before:, :bs], (0, 0, max(lk - lq, 0), 0)), bs)
    mine = (wpos @ vb).flatten(2, 3)[:, :, max(lk - lq, 0): lk]
    return out + torch.nn.functional.pad(mine, (0, 0, before, 0))
