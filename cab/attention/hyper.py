"""HyperAttention: angular-LSH sorting finds each query's heavy keys (a block of neighbouring keys in hash
order, computed exactly), uniform key sampling estimates the rest; causal attention by the recursive
split into two causal halves and one unmasked block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import real_keys, softmax_scale
from cab.attention.engine.routing import sample_ranks
from cab.attention.engine.scores import masked_softmax_rows
from cab.patterns import Pattern
from cab.registry import register_attention

_CHUNK = 64  # queries (sorted by their heavy window) that score one shared span of sorted keys


def _gray_rank(bits: torch.Tensor) -> torch.Tensor:
    """Position of a Gray code word (bits (..., r) in {0, 1}) in the reflected Gray sequence, so that
    neighbouring ranks differ in one hyperplane (the Hamming order of sortLSH)."""
    r = bits.shape[-1]
    out = torch.zeros(bits.shape[:-1], dtype=torch.long, device=bits.device)
    acc = torch.zeros_like(out)
    for i in range(r):  # binary from Gray: b_i = b_{i-1} xor g_i, most significant first
        acc = acc ^ bits[..., i].long()
        out = out * 2 + acc
    return out


def _combine(parts: "list[tuple[torch.Tensor, torch.Tensor]]") -> torch.Tensor:
    """Merge partial softmax outputs (out, lse) over disjoint key sets: weights exp(lse_p - logsumexp)."""
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    finite = torch.isfinite(total)
    total = torch.where(finite, total, torch.zeros_like(total))
    out = 0
    for o, lse in parts:
        w = torch.where(torch.isfinite(lse), torch.exp(lse - total), torch.zeros_like(lse))
        out = out + w[..., None] * o
    return out


@register_attention(
    "hyper", patterns=("NS", "CS", "NC", "CC"), family="sparse", exact=False, mechanism="M39",
    citation="Han et al., HyperAttention: Long-context Attention in Near-Linear Time, ICLR 2024",
)
class HyperAttention(Attention):
    """HyperAttention (Han et al. 2024, Alg. 1-4).

    Noncausal block (Alg. 2-3): angular LSH with `lsh_num_projs` (r) seeded hyperplanes per head hashes
    queries and keys to r-bit codes ranked in Gray-code (Hamming) order; keys are sorted by rank. Each
    query's heavy part is the `block_size` (b) keys around its rank in that order (computed exactly); the
    remainder is estimated from `sample_size` (m) keys drawn uniformly (with replacement) from the real
    keys of the block: a sampled key outside the query's heavy block enters numerator and denominator with
    weight n/m (n real keys), so both are unbiased estimates of the full sums (Alg. 3's column sampling
    with the normaliser estimated from the same samples). Blocks with at most b real keys are exact.

    Causal (Alg. 4): the recursion splits [0, 2S) into two causal halves and the unmasked block (queries of
    the second half x keys of the first), down to exact causal attention on blocks of `min_seq_len`
    (s0). The recursion is laid on fixed dyadic blocks from position 0 (sizes s0 2^j), so a longer
    sequence or appended padding never moves a boundary; each row merges its exact diagonal block and the
    unmasked blocks of every level by log-sum-exp.

    [BG] choice that keeps it leak-free: sortLSH in the paper sorts the queries too and pairs the j-th
    query block with the j-th key block, which makes a query's heavy keys depend on the other queries'
    hashes (a later query shifts an earlier one into another block: a leak under CS and CC). Here each
    query's heavy block is the b keys nearest to its own rank in the sorted keys, which depends only on
    that query and the keys; in the causal recursion the unmasked blocks only hold keys before the
    query. Samples come from a counter-based hash of (seed, level, block) over the ranks of the real keys,
    so they depend on no query and on no later key. Positions: CS is bottom-right aligned (query i at key
    position i + Lk - Lq).

    Defaults follow the authors' code: r = 7, b = 256, m = 256, s0 = 4096 (so causal sequences up to 4096
    are exact). The hashing and sampling are not differentiable; gradients flow through the exact and the
    sampled softmax terms. Cost: O(L (b + m) d) per level, O(L log(L / s0)(b + m) d + L s0 d) causal;
    the heavy part scores chunks of 64 queries (sorted by window) against one shared span of sorted keys: b plus
    the widest spread of window starts in a chunk (about 90 at L = 1024, 140 at 4096 on random inputs; at worst
    every key). No FlexAttention path: the sampled part is a reweighted estimate, not a mask, and the heavy
    blocks change with every input.
    """

    # L log(L/s0) (b + m) d
    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, lsh_num_projs: int = 7, block_size: int = 256,
                 sample_size: int = 256, min_seq_len: int = 4096, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if min(lsh_num_projs, block_size, sample_size, min_seq_len) < 1:
            raise ValueError("lsh_num_projs, block_size, sample_size and min_seq_len must be positive")
        self.lsh_num_projs, self.block_size, self.sample_size = lsh_num_projs, block_size, sample_size
        self.min_seq_len, self.seed = min_seq_len, seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(num_heads, head_dim, lsh_num_projs, generator=gen))
        self._counter: "list[int] | None" = None

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Pairs entering a softmax: heavy keys, samples outside the heavy block, and (CS) the exact
        diagonal-block pairs (counted by running forward)."""
        self._counter = [0]
        try:
            with torch.no_grad():
                self.forward(q, k, v, key_padding_mask)
            return self._counter[0]
        finally:
            self._counter = None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lsh_num_projs={self.lsh_num_projs}, block_size={self.block_size}, "
                f"sample_size={self.sample_size}, min_seq_len={self.min_seq_len}")

    def _rank(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Gray rank of the LSH code of every row of x (B, H * groups, L, D)."""
        planes = self.planes.to(x.dtype).repeat_interleave(groups, dim=0)
        return _gray_rank((torch.einsum("bgld,gdr->bglr", x, planes) > 0))

    def selection(self, q, k, real, groups: int, ids: torch.Tensor):
        """Heavy keys (key_sort (B, G, n_k): the keys in hash order; start (B, G, n_q): the first of the query's
        w sorted slots, those below n real) and samples (positions (B, G, m'), per-query validity (B, G, n_q,
        m'), weight n/m (B, G, 1, 1)) of the noncausal block(s): q (B, G, n_q, D), k (B, G, n_k, D), real
        (B, G, n_k); G = heads * groups; ids (G,) the stable sampling id of each block. Also returns n (B, G)."""
        nk = k.shape[-2]
        with torch.no_grad():
            kr = torch.where(real, self._rank(k, groups), 1 << 30)
            qr = self._rank(q, groups)
            key_sort = torch.argsort(kr * (nk + 1) + torch.arange(nk, device=q.device), dim=-1)
            sorted_rank = kr.gather(-1, key_sort)
            n = real.sum(-1)  # (B, G)
            w = min(self.block_size, nk)
            pos = torch.searchsorted(sorted_rank.contiguous(), qr.contiguous())
            start = (pos - w // 2).clamp(min=0)
            start = torch.minimum(start, (n[..., None] - w).clamp(min=0))
            # samples: ranks among the real keys (by position), hashed from (seed, salt, block)
            m = self.sample_size
            ranks = sample_ranks(self.seed, ids, m, n)  # (B, G, m); ids name (level, block, head) stably
            real_order = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)
            sampled = real_order.gather(-1, ranks)
            inverse = torch.argsort(key_sort, dim=-1)
            where = inverse.gather(-1, sampled)  # sorted index of each sample
            outside = (where[:, :, None, :] < start[..., None]) | (where[:, :, None, :] >= start[..., None] + w)
            outside = outside & (n > 0)[:, :, None, None]
            weight = (n.to(q.dtype) / m)[..., None, None]
        return key_sort, start, n, sampled, outside, weight

    def _heavy(self, q, k, v, key_sort, start, n, scale: float):
        """(out, lse) of each query's softmax over its heavy keys, the sorted slots [start, start + w) below n.
        The queries are sorted by start and cut into chunks of _CHUNK; a chunk scores one shared span of sorted
        keys (the union of its windows, padded to the widest chunk's) and masks each row to its own window:
        the same terms as gathering w keys per query, with one key gather per chunk instead of per query."""
        b, g, nq, d = q.shape
        nk, w, c = k.shape[-2], min(self.block_size, k.shape[-2]), max(1, min(_CHUNK, nq))
        with torch.no_grad():
            order = torch.argsort(start, dim=-1)
            chunks = -(-nq // c)
            order = torch.cat([order, order[..., -1:].expand(b, g, chunks * c - nq)], -1)  # pads repeat the last
            first = start.gather(-1, order).reshape(b, g, chunks, c)
            lo, hi = first[..., 0], first[..., -1]
            span = min(nk, int((hi - lo).max()) + w) if nq else w
            lo = torch.minimum(lo, torch.tensor(nk - span, device=q.device))  # start <= nk - w: hi + w still fits
            slots = lo[..., None] + torch.arange(span, device=q.device)  # (B, G, chunks, span)
            keys = key_sort.gather(-1, slots.reshape(b, g, -1))[..., None]
            ok = (slots[..., None, :] >= first[..., None]) & (slots[..., None, :] < first[..., None] + w)
            ok = ok & (slots < n[..., None, None])[..., None, :]
        qc = q.gather(2, order[..., None].expand(-1, -1, -1, d)).reshape(b, g, chunks, c, d)
        kc = k.gather(2, keys.expand(-1, -1, -1, d)).reshape(b, g, chunks, span, d)
        vc = v.gather(2, keys.expand(-1, -1, -1, v.shape[-1])).reshape(b, g, chunks, span, v.shape[-1])
        out, lse = masked_softmax_rows((qc * scale) @ kc.transpose(-1, -2), ok, vc)
        back = torch.argsort(order[..., :nq], dim=-1)  # sorted position of each query
        out = out.reshape(b, g, chunks * c, -1).gather(2, back[..., None].expand(-1, -1, -1, out.shape[-1]))
        return out, lse.reshape(b, g, chunks * c).gather(2, back)

    def _noncausal(self, q, k, v, real, groups: int, ids: torch.Tensor):
        """(out, lse) of the noncausal HyperAttention of q (B, G, n_q, D) over k, v (B, G, n_k, .)."""
        scale = softmax_scale(q.shape[-1])
        key_sort, start, n, sampled, outside, weight = self.selection(q.detach(), k.detach(), real, groups, ids)
        if self._counter is not None:
            w = min(self.block_size, k.shape[-2])
            self._counter[0] += int((n[..., None] - start).clamp(0, w).sum()) + int(outside.sum())
        heavy, lse_h = self._heavy(q, k, v, key_sort, start, n, scale)
        ks = k.gather(2, sampled[..., None].expand(-1, -1, -1, k.shape[-1]))
        vs = v.gather(2, sampled[..., None].expand(-1, -1, -1, v.shape[-1]))
        light, lse_l = masked_softmax_rows((q * scale) @ ks.transpose(-1, -2) + torch.log(weight), outside, vs)
        return _combine([(heavy, lse_h), (light, lse_l)]), torch.logsumexp(torch.stack([lse_h, lse_l]), 0)

    def _exact_causal_blocks(self, q, k, v, real, s0):
        """(out, lse) of exact causal attention inside aligned blocks of s0 (L a multiple of s0)."""
        b, h, length, d = q.shape
        nb = length // s0
        qb, kb, vb = (t.reshape(b, h, nb, s0, t.shape[-1]) for t in (q, k, v))
        s = (qb * softmax_scale(d)) @ kb.transpose(-1, -2)
        tri = torch.ones(s0, s0, dtype=torch.bool, device=q.device).tril()
        ok = tri & real.reshape(b, 1, nb, 1, s0)
        if self._counter is not None:
            self._counter[0] += h * int(ok.sum())
        out, lse = masked_softmax_rows(s, ok, vb)
        return out.reshape(b, h, length, -1), lse.reshape(b, h, length)

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        real = real_keys(key_padding_mask, b, lk, q.device)
        if self.pattern is not Pattern.CS:
            out, _ = self._noncausal(q, k, v, real[:, None].expand(b, h, lk), 1, torch.arange(h, device=q.device))
            return out
        # causal: bottom-right alignment, then dyadic blocks from position 0
        offset = lk - lq
        if offset > 0:
            q = F.pad(q, (0, 0, offset, 0))
        elif offset < 0:
            k, v = F.pad(k, (0, 0, -offset, 0)), F.pad(v, (0, 0, -offset, 0))
            real = F.pad(real, (-offset, 0), value=False)
        length = k.shape[-2]
        s0 = self.min_seq_len
        size = s0
        while size < length:
            size *= 2
        pad = size - length if size > s0 else 0  # up to s0 a single exact causal block, unpadded
        total = length + pad
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        real = F.pad(real, (0, pad), value=False)
        parts = [self._exact_causal_blocks(q, k, v, real, min(s0, total))]
        half, level = min(s0, total), 0
        while 2 * half <= total:
            pairs = total // (2 * half)
            qh = q.reshape(b, h, pairs, 2, half, d)[:, :, :, 1].reshape(b, h * pairs, half, d)
            kh = k.reshape(b, h, pairs, 2, half, d)[:, :, :, 0].reshape(b, h * pairs, half, d)
            vh = v.reshape(b, h, pairs, 2, half, v.shape[-1])[:, :, :, 0].reshape(b, h * pairs, half, v.shape[-1])
            rh = real.reshape(b, 1, pairs, 2, half)[:, :, :, 0].expand(b, h, pairs, half).reshape(b, h * pairs, half)
            ids = (torch.arange(pairs, device=q.device)[None, :] * h
                   + torch.arange(h, device=q.device)[:, None]).reshape(-1)
            o, lse = self._noncausal(qh, kh, vh, rh, pairs, ids + ((level + 1) << 24))
            o = o.reshape(b, h, pairs, half, -1)
            full_o = torch.stack([torch.zeros_like(o), o], 3)  # only the second half of each pair has a term
            lse_pairs = lse.reshape(b, h, pairs, half)
            full_l = torch.stack([torch.full_like(lse_pairs, float("-inf")), lse_pairs], 3)
            parts.append((full_o.reshape(b, h, total, -1), full_l.reshape(b, h, total)))
            half, level = 2 * half, level + 1
        out = _combine(parts)
        start = max(offset, 0)
        return out[:, :, start:start + lq]

    def _layout(self, lq: int, lk: int) -> "tuple[int, int, int]":
        """(offset, padded length, base block) of the causal layout."""
        length = max(lq, lk)
        s0 = self.min_seq_len
        size = s0
        while size < length:
            size *= 2
        total = size if size > s0 else length
        return lk - lq, total, min(s0, total)

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row, one explicit softmax over every term the row gets: its exact keys (CS: its diagonal
        block, keys <= the row) and, for every block it meets, its heavy keys (weight 1) and its samples
        outside them (weight n/m). The selection is re-derived here, vector by vector and row by row (not
        taken from `selection`): a vector's code has bit t = [x . plane_t > 0] (plane 0 most significant)
        and its rank is the code's index n in the reflected Gray sequence n ^ (n >> 1); a block's n real keys
        are sorted by (rank, position); a query's heavy keys are the w = min(b, block slots) sorted keys
        from start = #(real keys ranked below the query) - w // 2, clamped to [0, max(n - w, 0)]; its samples
        are the real keys (in position order) at the m ranks `sample_ranks` draws for the block's id."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk, scale, m = k.shape[-2], softmax_scale(d), self.sample_size
        real = [[key_padding_mask is None or not key_padding_mask[bi, j] for j in range(lk)] for bi in range(b)]
        gray_index = {n ^ (n >> 1): n for n in range(1 << self.lsh_num_projs)}

        def rank(x: torch.Tensor, hi: int) -> int:
            code = 0
            for t in range(self.lsh_num_projs):
                code = 2 * code + int(float(x.detach() @ self.planes[hi, :, t].to(x.dtype)) > 0)
            return gray_index[code]

        q_rank = [[[rank(q[bi, hi, i], hi) for i in range(lq)] for hi in range(h)] for bi in range(b)]
        k_rank = [[[rank(k[bi, hi, j], hi) for j in range(lk)] for hi in range(h)] for bi in range(b)]
        terms: dict = {}  # (bi, hi, i) -> [(logits (n,), values (n, Dv))]

        def add(bi: int, hi: int, i: int, keys: "list[int]", bias: float = 0.0):
            if keys:
                logits = (k[bi, hi, keys] @ q[bi, hi, i]) * scale + bias
                terms.setdefault((bi, hi, i), []).append((logits, v[bi, hi, keys]))

        def add_block(rows: "list[int]", keys: "list[int]", ident: int):
            """Noncausal HyperAttention terms of query rows `rows` (original indices) over the key slots `keys`
            (original indices, -1 = a padding slot); head hi samples with id ident + hi."""
            w = min(self.block_size, len(keys))
            for bi in range(b):
                members = [j for j in keys if j >= 0 and real[bi][j]]  # the block's real keys, by position
                n = len(members)
                if n == 0:
                    continue
                for hi in range(h):
                    order = sorted(members, key=lambda j: (k_rank[bi][hi][j], j))
                    draws = sample_ranks(self.seed, torch.tensor([ident + hi]), m, torch.tensor([[n]]))[0, 0]
                    sampled = [members[int(r)] for r in draws]
                    for i in rows:
                        below = sum(1 for j in members if k_rank[bi][hi][j] < q_rank[bi][hi][i])
                        start = min(max(below - w // 2, 0), max(n - w, 0))
                        heavy = order[start:start + w]
                        add(bi, hi, i, heavy)
                        add(bi, hi, i, [j for j in sampled if j not in heavy], math.log(n / m))

        if self.pattern is not Pattern.CS:
            add_block(list(range(lq)), list(range(lk)), 0)
        else:
            offset, total, s0 = self._layout(lq, lk)
            shift, kshift = max(offset, 0), -min(offset, 0)  # padded coordinates: query i + shift, key j + kshift

            def key_at(p):
                return (p - kshift) if 0 <= p - kshift < lk else -1

            for i in range(lq):
                p = i + shift
                diag = [key_at(pp) for pp in range((p // s0) * s0, p + 1)]
                for bi in range(b):
                    for hi in range(h):
                        add(bi, hi, i, [j for j in diag if j >= 0 and real[bi][j]])
            half, level = s0, 0
            while 2 * half <= total:
                for pair in range(total // (2 * half)):
                    first = pair * 2 * half  # queries: the pair's second half, keys: its first half
                    rows = [pp - shift for pp in range(first + half, first + 2 * half) if 0 <= pp - shift < lq]
                    if rows:
                        keys = [key_at(pp) for pp in range(first, first + half)]
                        add_block(rows, keys, pair * h + ((level + 1) << 24))
                half, level = 2 * half, level + 1
        out = torch.zeros(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
        for (bi, hi, i), lst in terms.items():
            out[bi, hi, i] = torch.softmax(torch.cat([t[0] for t in lst]), 0) @ torch.cat([t[1] for t in lst])
        return out
