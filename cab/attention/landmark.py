"""Landmark attention: one landmark per block of keys; each query retrieves the top-k blocks by landmark
score and attends with the grouped softmax (a block's share of the row's probability is its landmark's
weight, spread over the block's tokens by a softmax within the block)."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import query_positions, real_keys, set_positive, softmax_scale
from cab.attention.engine.routing import block_tokens, pool_blocks, topk_valid
from cab.registry import register_attention

_ELEMENTS = 1 << 24


@register_attention(
    "landmark", patterns=("NS", "CS", "NC", "CC"), family="retrieval", exact=False, mechanism="M42",
    citation="Mohtashami and Jaggi, Landmark Attention: Random-Access Infinite Context Length for "
    "Transformers, NeurIPS 2023",
)
class LandmarkAttention(Attention):
    """Landmark attention with top-k block retrieval (Mohtashami & Jaggi 2023, Sec. 3.1 grouped softmax,
    Sec. 3.2 retrieval).

    Keys are cut into blocks of `block_size` (l) positions from position 0. Block c has a landmark key
    l_c; the row's top-level softmax runs over its own block's visible tokens (self patterns) and the
    landmarks of the `topk` retrieved blocks, ranked by the scaled landmark score q_i . l_c / sqrt(d);
    a retrieved block's weight is then spread over its real tokens by the softmax of q_i . k_j within the
    block (the grouped softmax, Eq. 2-3):
        o_i = sum_{j in own} P_ij v_j + sum_{c retrieved} P_ic sum_{j in c} softmax_{j in c}(s_ij) v_j,
        P = softmax over {s_ij : j in own block} U {q_i . l_c / sqrt(d) : c retrieved}.
    [EJ] In the paper l_c is the key of a trained landmark token inserted after every block; an attention
    operator on given q, k, v has no such token, so l_c is the mean of the block's real keys (a landmark
    a model could learn to emit; training one is a model change). Defaults: l = 50 and k = 4 (the paper's
    block length and retrieved-block count).

    Patterns: NS: own block = the query's block, other blocks are retrieved. CS: query i sits at key
    position p = i + Lk - Lq (bottom-right); its own block is attended causally (keys <= p) and only
    complete past blocks (all positions < the own block) can be retrieved: nothing after p is read. NC,
    CC: queries and keys share no positions, so there is no own block and every block can be retrieved,
    by the row's own query only. Retrieval (top-k) is not differentiable; gradients flow through the
    grouped softmax, including the landmark scores of the retrieved blocks (the landmark is a mean of keys).

    Cost: landmark scores O(Lq (Lk / l) d) (the paper's retrieval also scores every landmark) plus the
    gathered attention O(Lq (k + 1) l d), in query chunks; no Lq x Lk tensor. No FlexAttention path: the
    grouped softmax is not a mask.
    """

    # every landmark is scored: L^2/l; memory is chunked
    complexity = {"time": 2, "memory": 1}

    repr_fields = ("block_size", "topk")

    def __init__(self, pattern, num_heads, head_dim, block_size: int = 50, topk: int = 4):
        super().__init__(pattern, num_heads, head_dim)
        set_positive(self, block_size=block_size, topk=topk)

    def _landmarks(self, k, key_padding_mask):
        b, _, lk, _ = k.shape
        real = real_keys(key_padding_mask, b, lk, k.device)
        marks, counts = pool_blocks(k, real, self.block_size)
        return real, marks, counts > 0

    def _retrieve(self, q, marks, has_keys, rows, lq, lk):
        """(own block (n,) or None, retrieved blocks (B, H, n, k'), valid) for query rows `rows`."""
        b, h = q.shape[:2]
        nb = marks.shape[2]
        scores = q[:, :, rows] @ marks.transpose(-1, -2)
        allowed = has_keys[:, None, None, :].expand_as(scores)
        own = None
        if not self.cross:
            pos = query_positions(lq, lk, q.device)[rows]
            own = torch.div(pos, self.block_size, rounding_mode="floor")
            blocks = torch.arange(nb, device=q.device)
            other = (blocks[None, :] < own[:, None]) if self.causal else (blocks[None, :] != own[:, None])
            allowed = allowed & other[None, None]
        blocks, ok = topk_valid(scores, allowed, self.topk)
        return own, blocks, ok

    def _attend(self, q, k, v, real, marks, own, blocks, ok, rows, lk):
        """Grouped softmax of the rows `rows` given their own block and retrieved blocks."""
        b, h, n = blocks.shape[:3]
        d, dv, bs = q.shape[-1], v.shape[-1], self.block_size
        scale = softmax_scale(d)
        qr = q[:, :, rows] * scale
        kf, vf = k.reshape(-1, d), v.reshape(-1, dv)
        base = (torch.arange(b * h, device=q.device) * lk).reshape(b, h, 1, 1)
        idx = block_tokens(blocks, bs)  # (B, H, n, k' bs)
        tok_ok = (idx < lk) & real.gather(1, idx.clamp(max=lk - 1).reshape(b, -1)).reshape(idx.shape)
        tok_ok = tok_ok & ok.repeat_interleave(bs, dim=-1)
        flat = (idx.clamp(max=lk - 1) + base).reshape(-1)
        kg = kf.index_select(0, flat).reshape(b, h, n, -1, d)
        vg = vf.index_select(0, flat).reshape(b, h, n, -1, dv)
        kk = blocks.shape[-1]
        s = (kg @ qr[..., None])[..., 0].masked_fill(~tok_ok, float("-inf")).reshape(b, h, n, kk, bs)
        inner = torch.softmax(s.masked_fill(~ok[..., None], 0.0), dim=-1)  # invalid blocks: any finite weights
        o_blocks = (inner[..., None, :] @ vg.reshape(b, h, n, kk, bs, dv))[..., 0, :]  # (B, H, n, k', Dv)
        mark = marks.reshape(-1, d).index_select(0, (blocks + base // lk * marks.shape[2]).reshape(-1))
        s_mark = (mark.reshape(b, h, n, kk, d) @ qr[..., None])[..., 0].masked_fill(~ok, float("-inf"))
        logits, values = [s_mark], [o_blocks]
        if own is not None:
            own_idx = own.clamp(min=0)[:, None] * bs + torch.arange(bs, device=q.device)  # (n, bs)
            own_ok = (own >= 0)[:, None] & (own_idx < lk)
            if self.causal:
                own_ok = own_ok & (own_idx <= query_positions(q.shape[-2], lk, q.device)[rows, None])
            own_ok = own_ok[None] & real[:, own_idx.clamp(max=lk - 1)]  # (B, n, bs)
            of = (own_idx.clamp(max=lk - 1)[None, None] + base).reshape(-1)
            ko = kf.index_select(0, of).reshape(b, h, n, bs, d)
            vo = vf.index_select(0, of).reshape(b, h, n, bs, dv)
            logits.insert(0, (ko @ qr[..., None])[..., 0].masked_fill(~own_ok[:, None], float("-inf")))
            values.insert(0, vo)
        z = torch.cat(logits, dim=-1)
        mx = z.amax(-1, keepdim=True)
        empty = torch.isinf(mx)
        w = torch.exp(z - torch.where(empty, torch.zeros_like(mx), mx))
        w = w / torch.where(empty, torch.ones_like(mx), w.sum(-1, keepdim=True))
        return (w[..., None, :] @ torch.cat(values, dim=-2))[..., 0, :]

    def _chunks(self, q, nb):
        width = (self.topk + 1) * self.block_size * q.shape[-1] + nb
        step = max(1, _ELEMENTS // max(1, q.shape[0] * q.shape[1] * width))
        return [slice(r0, min(r0 + step, q.shape[-2])) for r0 in range(0, q.shape[-2], step)]

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        real, marks, has_keys = self._landmarks(k, key_padding_mask)
        outs = []
        for rows in self._chunks(q, marks.shape[2]):
            with torch.no_grad():
                own, blocks, ok = self._retrieve(q.detach(), marks.detach(), has_keys, rows, lq, lk)
            outs.append(self._attend(q, k, v, real, marks, own, blocks, ok, rows, lk))
        return torch.cat(outs, dim=2)

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Token pairs scored (own block and retrieved blocks; the Lk / l landmark scores are not counted)."""
        k = repeat_kv(k, q.shape[1])
        b, h, lq, _ = q.shape
        lk, bs = k.shape[-2], self.block_size
        real, marks, has_keys = self._landmarks(k, key_padding_mask)
        total = 0
        with torch.no_grad():
            for rows in self._chunks(q, marks.shape[2]):
                own, blocks, ok = self._retrieve(q, marks, has_keys, rows, lq, lk)
                idx = block_tokens(blocks, bs)
                tok = (idx < lk) & real.gather(1, idx.clamp(max=lk - 1).reshape(b, -1)).reshape(idx.shape)
                total += int((tok & ok.repeat_interleave(bs, dim=-1)).sum())
                if own is not None:
                    pos = query_positions(lq, lk, q.device)[rows]
                    j = torch.arange(lk, device=q.device)
                    mine = (torch.div(j, bs, rounding_mode="floor")[None, :] == own[:, None]) & (own >= 0)[:, None]
                    if self.causal:
                        mine = mine & (j[None, :] <= pos[:, None])
                    total += h * int((mine[None] & real[:, None, :]).sum())
        return total

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row: landmarks as explicit means, retrieval by an explicit sort, the grouped softmax as an
        explicit normalised sum over the own block's tokens and the retrieved blocks."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk, bs, scale = k.shape[-2], self.block_size, softmax_scale(d)
        real = real_keys(key_padding_mask, b, lk, q.device).cpu()
        nb = -(-lk // bs)
        out = torch.zeros(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
        for bi in range(b):
            members = [[j for j in range(c * bs, min((c + 1) * bs, lk)) if real[bi, j]] for c in range(nb)]
            for hi in range(h):
                marks = {c: k[bi, hi, m].mean(0) for c, m in enumerate(members) if m}
                for i in range(lq):
                    p = i + lk - lq
                    own = None if self.cross else p // bs
                    if own is not None and p < 0:
                        continue
                    cand = [c for c in marks if own is None or (c < own if self.causal else c != own)]
                    ranked = sorted(cand, key=lambda c: (-float(q[bi, hi, i].detach() @ marks[c].detach()), c))
                    chosen = ranked[: self.topk]
                    logits, values = [], []
                    if own is not None and own < nb:
                        mine = [j for j in members[own] if not self.causal or j <= p]
                        if mine:
                            logits.append((k[bi, hi, mine] @ q[bi, hi, i]) * scale)
                            values.append(v[bi, hi, mine])
                    for c in chosen:
                        inner = torch.softmax((k[bi, hi, members[c]] @ q[bi, hi, i]) * scale, 0)
                        logits.append(((q[bi, hi, i] @ marks[c]) * scale)[None])
                        values.append((inner @ v[bi, hi, members[c]])[None])
                    if logits:
                        w = torch.softmax(torch.cat(logits), 0)
                        out[bi, hi, i] = w @ torch.cat(values)
        return out
