"""Landmark attention: one landmark per block of keys; each query retrieves the top-k blocks by landmark
score and attends with the grouped softmax (a block's share of the row's probability is its landmark's
weight, spread over the block's tokens by a softmax within the block)."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.block_pairs import block_pairs, grouped_softmax, key_blocks, own_block_scores
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
    attention O(Lq (k + 1) l d): the own block as a blocked matmul, a retrieved block as one matmul of its keys
    with the queries that retrieved it (block_pairs), in query chunks; no Lq x Lk tensor. No FlexAttention
    path: the grouped softmax is not a mask.
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

    def _chunks(self, q, nb):
        width = nb + self.topk * (self.block_size + 2 * q.shape[-1])  # scores, pair scores, queries, values
        step = max(1, _ELEMENTS // max(1, q.shape[0] * q.shape[1] * width))
        return [slice(r0, min(r0 + step, q.shape[-2])) for r0 in range(0, q.shape[-2], step)]

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk, bs = q.shape[-2], k.shape[-2], self.block_size
        real, marks, has_keys = self._landmarks(k, key_padding_mask)
        kb, vb, tok_ok = key_blocks(k, bs), key_blocks(v, bs), key_blocks(real, bs)
        qs = q * softmax_scale(q.shape[-1])
        logits, values = [], []
        for rows in self._chunks(q, marks.shape[2]):
            with torch.no_grad():
                _, blocks, ok = self._retrieve(q.detach(), marks.detach(), has_keys, rows, lq, lk)
            s_mark = (qs[:, :, rows] @ marks.transpose(-1, -2)).gather(-1, blocks)
            logits.append(s_mark.masked_fill(~ok, float("-inf")))
            values.append(block_pairs(qs[:, :, rows], kb, vb, tok_ok, blocks, ok, with_lse=False)[1])
        own = None if self.cross else own_block_scores(qs, kb, tok_ok, lk, self.causal)
        return grouped_softmax(own, vb, torch.cat(logits, dim=2), torch.cat(values, dim=2), lk)

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
        rows = []  # rows and per-head slices, not in-place writes and indexing of the whole q, k, v: their backward
        # would allocate a gradient of the whole tensor per row
        for bi in range(b):
            members = [[j for j in range(c * bs, min((c + 1) * bs, lk)) if real[bi, j]] for c in range(nb)]
            for hi in range(h):
                kh, vh = k[bi, hi], v[bi, hi]
                keys = {c: kh[m] for c, m in enumerate(members) if m}
                vals = {c: vh[m] for c, m in enumerate(members) if m}
                marks = {c: keys[c].mean(0) for c in keys}
                for i, qi in enumerate(q[bi, hi].unbind(0)):
                    rows.append(torch.zeros_like(vh[0]))
                    p = i + lk - lq
                    own = None if self.cross else p // bs
                    if own is not None and p < 0:
                        continue
                    cand = [c for c in marks if own is None or (c < own if self.causal else c != own)]
                    ranked = sorted(cand, key=lambda c: (-float(qi.detach() @ marks[c].detach()), c))
                    chosen = ranked[: self.topk]
                    logits, values = [], []
                    if own is not None and own < nb:
                        mine = [j for j in members[own] if not self.causal or j <= p]
                        if mine:
                            logits.append((kh[mine] @ qi) * scale)
                            values.append(vh[mine])
                    for c in chosen:
                        inner = torch.softmax((keys[c] @ qi) * scale, 0)
                        logits.append(((qi @ marks[c]) * scale)[None])
                        values.append((inner @ vals[c])[None])
                    if logits:
                        w = torch.softmax(torch.cat(logits), 0)
                        rows[-1] = w @ torch.cat(values)
        return torch.stack(rows).reshape(b, h, lq, v.shape[-1])
