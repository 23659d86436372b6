"""HiP: hierarchically pruned attention. Per query, a tree search over key segments (split every kept
segment in two, score each half by one representative key, keep the best halves) finds the top segments,
then exact softmax attention runs over their keys."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import query_positions, real_keys, set_positive, softmax_scale
from cab.attention.engine.routing import gathered_attention
from cab.attention.engine.scores import masked_softmax_reference, masked_softmax_rows
from cab.patterns import Pattern
from cab.registry import register_attention

_ELEMENTS = 1 << 24  # gathered key elements (or scores, dense) per chunk of queries
_DENSE_RATIO = 4  # dense score rows while Lk <= this times the k b_k kept keys


@register_attention(
    "hip", patterns=("NS", "CS", "NC", "CC"), family="sparse", exact=False, mechanism="M40",
    citation="Lee et al., HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning, "
    "ICLR 2025",
)
class HiPAttention(Attention):
    """HiP mask estimation (Lee et al., Sec. 3, Alg. 1) and block-sparse attention on the estimated mask.

    For each query row, over the n visible real keys (counted by rank among the real keys, so holes of
    padding are skipped and appended padding changes nothing): start from `topk` (k) equal segments of the
    n ranks; repeatedly split every segment longer than `block_size` (b_k) at its midpoint, score each half
    by its representative key (the half's first key; [BG] the paper scores a branch by one representative
    token, we take its first) with the row's own scaled dot product q . k_rep, and keep the k best halves;
    stop when every kept segment has at most b_k keys. The row then attends with exact softmax to the keys
    of its k segments (at most k b_k). Rows seeing at most k b_k keys attend to all of them (exact).
    Defaults: k = 64 segments of b_k = 8 keys (512 keys per row, the paper's k = 512 budget).

    [BG]/[EJ] choices: the paper estimates one mask per block of b_q queries (pooled, for GPU efficiency);
    a query block contains later queries, so under CS that would leak, and here every query searches on
    its own (b_q = 1) in every pattern. The paper's optional sink and sliding-window keys are not added.

    Patterns: CS row i (at key position p = i + Lk - Lq, bottom-right) searches keys <= p only; CC, NC, NS
    rows search every real key; nothing of another query is read. The search (top-k) is not
    differentiable; gradients flow through the final sparse softmax.

    Cost: O(Lq k log(Lk / (k b_k)) d) for the search plus O(Lq k b_k d) for the attention (the paper's
    O(T log T)); queries are processed in chunks and past Lk = 4 k b_k nothing Lq x Lk is formed. Up to
    that length (the benchmarked ones) a chunk's rows score every key in one matmul instead: the search reads
    its representative scores there and the softmax runs on them masked to the kept keys (the same keys and
    weights; a matmul over <= 4 k b_k keys costs less than gathering k b_k keys and values per row).
    No FlexAttention path: the mask is content-dependent per call.
    """

    # L k log L d
    complexity = {"time": 1, "memory": 1}

    repr_fields = ("topk", "block_size")

    def __init__(self, pattern, num_heads, head_dim, topk: int = 64, block_size: int = 8):
        super().__init__(pattern, num_heads, head_dim)
        set_positive(self, topk=topk, block_size=block_size)

    def _layout(self, b, lq, lk, key_padding_mask, device):
        """(position of the r-th real key (B, Lk), visible real keys per row (B, Lq))."""
        real = real_keys(key_padding_mask, b, lk, device)
        order = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)
        if self.pattern is Pattern.CS:
            pos = query_positions(lq, lk, device)
            cum = torch.cumsum(real.long(), dim=-1)
            counts = torch.where(pos >= 0, cum[:, pos.clamp(0, lk - 1)], 0)
        else:
            counts = real.sum(-1, keepdim=True).expand(b, lq)
        return order, counts

    def _search(self, q, k, order, counts, scores=None):
        """Kept segments [start, end) in key ranks, (B, H, n, k) each, for queries q (B, H, n, D). A half is
        scored by its representative key: read from `scores` (B, H, n, Lk), the rows' scaled scores against
        every key, when given, else gathered and multiplied here."""
        b, h, n, d = q.shape
        lk = k.shape[-2]
        kk, bk = self.topk, self.block_size
        # the k first segments depend on the row's count alone: computed once for every head
        bounds = (torch.arange(kk + 1, device=q.device) * counts[:, None, :, None]) // kk
        start, end = bounds[..., :-1].expand(b, h, n, kk), bounds[..., 1:].expand(b, h, n, kk)
        kf = k.reshape(b * h * lk, d)
        base = (torch.arange(b * h, device=q.device) * lk).reshape(b, h, 1, 1)
        scale = softmax_scale(d)
        while True:
            split = (end - start) > bk
            if not bool(split.any()):
                break
            mid = torch.where(split, (start + end) >> 1, end)
            c_start = torch.cat([start, mid], dim=-1)
            c_end = torch.cat([mid, end], dim=-1)
            rep = order.gather(1, c_start.clamp(max=lk - 1).reshape(b, -1)).reshape(c_start.shape)
            if scores is None:
                keys = kf.index_select(0, (rep + base).reshape(-1)).reshape(b, h, n, 2 * kk, d)
                score = (keys @ (q * scale)[..., None])[..., 0]
            else:
                score = scores.gather(-1, rep)
            score = score.masked_fill(c_end <= c_start, float("-inf"))
            best = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :kk]
            start, end = c_start.gather(-1, best), c_end.gather(-1, best)
        return start, end

    def _segments(self, q, k, order, counts, rows):
        """(start, end, scores): the kept segments of the query rows `rows` (see _search), and in dense mode
        (see _dense) the rows' scaled scores against every key (B, H, n, Lk) it read them from, else None."""
        scores = None
        if self._dense(k.shape[-2]):
            scores = (q[:, :, rows] * softmax_scale(q.shape[-1])) @ k.transpose(-1, -2)
        with torch.no_grad():
            start, end = self._search(q[:, :, rows].detach(), k.detach(), order, counts[:, rows],
                                      None if scores is None else scores.detach())
        return start, end, scores

    def _select(self, start, end, order, lk):
        """(idx (B, H, n, k b_k) key positions, valid) of the kept segments [start, end) in key ranks."""
        b = start.shape[0]
        ranks = (start[..., None] + torch.arange(self.block_size, device=start.device)).flatten(-2)
        valid = ranks < end.repeat_interleave(self.block_size, dim=-1)
        idx = order.gather(1, ranks.clamp(max=lk - 1).reshape(b, -1)).reshape(ranks.shape)
        return idx, valid

    @staticmethod
    def _mask(start, end, order, lk):
        """(B, H, n, Lk) bool key-position mask of the kept segments [start, end) in key ranks: +1 at each
        start, -1 at each end, and a running sum (segments are disjoint), read at each key's rank (order None:
        no padding, ranks are positions)."""
        b, h, n, _ = start.shape
        edges = torch.zeros(b, h, n, lk + 1, dtype=torch.int32, device=start.device)
        edges.scatter_add_(-1, start, torch.ones_like(start, dtype=torch.int32))
        edges.scatter_add_(-1, end, torch.full_like(end, -1, dtype=torch.int32))
        inside = edges[..., :lk].cumsum(-1, dtype=torch.int32) > 0
        if order is None:
            return inside
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(lk, device=order.device).expand_as(order))
        return inside.gather(-1, rank[:, None, None, :].expand(b, h, n, lk))

    def _dense(self, lk):
        """Whether rows attend through a masked score row over all Lk keys instead of gathering their k b_k
        keys: a matmul over Lk keys is cheaper than gathering a copy of k b_k keys and values per row."""
        return lk <= _DENSE_RATIO * self.topk * self.block_size

    def _chunks(self, q, lk):
        """Slices of query rows whose search gathers (or whose dense rows hold about 4 tensors of scores) at most
        _ELEMENTS elements."""
        width = 4 * lk if self._dense(lk) else 2 * self.topk * q.shape[-1]
        step = max(1, _ELEMENTS // max(1, q.shape[0] * q.shape[1] * width))
        return [slice(r0, min(r0 + step, q.shape[-2])) for r0 in range(0, q.shape[-2], step)]

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lk = k.shape[-2]
        order, counts = self._layout(q.shape[0], q.shape[-2], lk, key_padding_mask, q.device)
        outs = []
        for rows in self._chunks(q, lk):
            start, end, scores = self._segments(q, k, order, counts, rows)
            if scores is not None:  # dense: the softmax runs on the same scores, masked to the kept keys
                mask = self._mask(start, end, None if key_padding_mask is None else order, lk)
                outs.append(masked_softmax_rows(scores, mask, v)[0])
                continue
            idx, valid = self._select(start, end, order, lk)
            outs.append(gathered_attention(q[:, :, rows, None], k, v, idx, valid[:, :, :, None],
                                           softmax_scale(q.shape[-1]))[:, :, :, 0])
        return torch.cat(outs, dim=2)

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Token pairs scored: up to Lk = 4 k b_k (the dense path) every row scores every key it sees, as a dense
        attention does (each row's visible real keys); past it, the final sparse softmax's pairs, the kept
        segments' lengths (the 2k representative scores per level are not counted). So achieved sparsity reports
        what this implementation computes, not the algorithm's budget."""
        k = repeat_kv(k, q.shape[1])
        lk = k.shape[-2]
        order, counts = self._layout(q.shape[0], q.shape[-2], lk, key_padding_mask, q.device)
        if self._dense(lk):
            return int(counts.sum()) * q.shape[1]
        with torch.no_grad():
            return sum(int((end - start).sum()) for start, end, _ in
                       (self._segments(q, k, order, counts, rows) for rows in self._chunks(q, lk)))

    def reference(self, q, k, v, key_padding_mask=None):
        """The tree search row by row on explicit lists of the row's visible real keys (segments as Python
        ranges, halves ranked by an explicit sort), then a dense softmax row over the kept keys."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        real = real_keys(key_padding_mask, b, lk, q.device).cpu()
        qd, kd = q.detach(), k.detach()
        allowed = torch.zeros(b, h, lq, lk, dtype=torch.bool)
        kk, bk, scale = self.topk, self.block_size, softmax_scale(d)
        for bi in range(b):
            for i in range(lq):
                limit = i + lk - lq if self.pattern is Pattern.CS else lk - 1
                keys = [j for j in range(lk) if real[bi, j] and j <= limit]
                n = len(keys)
                for hi in range(h):
                    segments = [(s * n // kk, (s + 1) * n // kk) for s in range(kk)]
                    while any(e - s > bk for s, e in segments):
                        children = []
                        for s, e in segments:
                            m = (s + e) // 2 if e - s > bk else e
                            children += [(s, m), (m, e)]
                        scored = [(float(kd[bi, hi, keys[s]] @ qd[bi, hi, i]) * scale if e > s else float("-inf"), c)
                                  for c, (s, e) in enumerate(children)]
                        segments = [children[c] for _, c in sorted(scored, key=lambda t: (-t[0], t[1]))[:kk]]
                    for s, e in segments:
                        for r in range(s, e):
                            allowed[bi, hi, i, keys[r]] = True
        return masked_softmax_reference(q, k, v, allowed.to(q.device), scale)
