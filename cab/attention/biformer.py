"""BiFormer's bi-level routing attention (BRA) on a 1-D sequence: route at the level of regions of
consecutive tokens (top-k regions by pooled query-key affinity), then token-to-token softmax attention over
the union of the routed regions' tokens."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.block_pairs import block_pairs, grouped_softmax, key_blocks, own_block_scores
from cab.attention.engine.prepare import query_positions, real_keys, real_queries, set_positive, softmax_scale
from cab.attention.engine.routing import (
    block_tokens,
    gathered_attention,
    group_queries,
    pool_blocks,
    selection_count,
    topk_valid,
)
from cab.attention.engine.scores import masked_softmax_reference
from cab.patterns import Pattern
from cab.registry import register_attention


@register_attention(
    "biformer", patterns=("NS", "CS", "NC", "CC"), family="routing", exact=False, mechanism="M37",
    citation="Zhu et al., BiFormer: Vision Transformer with Bi-Level Routing Attention, CVPR 2023",
)
class BiFormerAttention(Attention):
    """Bi-level routing attention (Zhu et al. 2023, Sec. 3.2, Eqs. 1-4 and Alg. 1), in 1-D.

    The paper partitions an H x W feature map into S x S regions; on a sequence a region is `region_size`
    (R) consecutive positions, counted from position 0 (a fixed size rather than a fixed number of regions,
    so that appending padding or a longer prefix never moves a region boundary). Region queries Q^r and keys
    K^r are the means of the region's (real) queries and keys (Eq. 2); the region affinity A^r = Q^r K^r^T
    (Eq. 2) keeps, per query region, the `topk` key regions with the largest affinity (Eq. 3, the routing
    index I^r); every query of the region then attends, with ordinary scaled softmax, to the tokens of those
    regions (Eq. 4, gather + attention). The local-context enhancement term LCE(V) (a depth-wise conv on V)
    is a separate learned layer of the BiFormer block, not part of the routing attention, and is omitted.
    Defaults: R = 64 tokens (stage-3 regions of the paper hold 7x7..8x8 = 49-64 tokens), topk = 4 (the
    paper's stage-2 value; it uses 1, 4, 16 and all regions in stages 1-4).

    Patterns:
    - NS, NC: exactly the paper: region-level routing with pooled queries (cross queries are regionised by
      R on their own axis; padded self queries are left out of the pool, padded keys of the key pool, and a
      region with no real key is never routed to).
    - CS: a pooled query region contains later queries and a pooled current key region contains later keys,
      so region-level routing would leak. Each query routes on its own: q_i . K^r over the *complete* past
      regions (all of whose positions are before i's region), keeps the top (topk - 1), and always attends
      its own region causally (keys j <= i). Query i sits at key position i + Lk - Lq (bottom-right).
    - CC: every key is visible, so each query routes on its own: q_i . K^r over all key regions, top-k.
    Routing (the top-k) is not differentiable; gradients flow through the pooled-free token attention only
    (as in the paper, whose routing index is a hard top-k).

    Efficient path: NS, NC: queries grouped by region, each group gathers the tokens of its topk regions
    (B, H, G, topk R, D) in chunks and runs one softmax. CS, CC: the queries routed to a region are gathered
    and scored against its keys in one matmul per region (the own region of CS: one per region of queries),
    and each query's softmax is merged from its regions' log-sum-exps (cab.attention.landmark.block_pairs).
    O(Lq topk R d) plus the routing O(Lq Lk d / R) (NS, NC: O((L/R)^2 d)); no Lq x Lk tensor. No FlexAttention
    path: the mask is content-dependent per call, so a compiled block mask would be rebuilt every forward.
    """

    # the routing scores are (L/R)^2 (NS, NC) or L^2/R (CS, CC) for a fixed region size
    complexity = {"time": 2, "memory": 1}

    repr_fields = ("region_size", "topk")

    def __init__(self, pattern, num_heads, head_dim, region_size: int = 64, topk: int = 4):
        super().__init__(pattern, num_heads, head_dim)
        set_positive(self, region_size=region_size, topk=topk)

    # the routing, shared by forward and computed_pairs ---------------------------------------------

    def _route(self, q, k, key_padding_mask):
        """(group, idx (B, H, G, N), valid (B, H, G, group|1, N)) token selection of every query group."""
        b, h, lq, _ = q.shape
        lk, r = k.shape[-2], self.region_size
        real_k = real_keys(key_padding_mask, b, lk, q.device)
        k_reg, k_count = pool_blocks(k, real_k, r)  # (B, H, nk, D)
        has_keys = (k_count > 0)[:, None]  # (B, 1, nk)
        if self.pattern in (Pattern.NS, Pattern.NC):
            real_q = real_queries(self.pattern, real_k, lq)
            q_reg, _ = pool_blocks(q, real_q, r)  # (B, H, nq, D)
            affinity = q_reg @ k_reg.transpose(-1, -2)  # (B, H, nq, nk)
            regions, ok = topk_valid(affinity, has_keys[:, :, None, :].expand_as(affinity), self.topk)
            idx = block_tokens(regions, r)
            valid = ok.repeat_interleave(r, dim=-1)[:, :, :, None, :] & (idx < lk)[:, :, :, None, :]
            valid = valid & real_k.gather(1, idx.clamp(max=lk - 1).reshape(b, -1)).reshape(idx.shape)[:, :, :, None]
            return r, idx, valid
        regions, ok = self._query_routes(q, k_reg, has_keys, lk)
        if self.pattern is Pattern.CS:
            own = torch.div(query_positions(lq, lk, q.device), r, rounding_mode="floor")
            regions = torch.cat([regions, own.clamp(min=0).expand(b, h, lq)[..., None]], dim=-1)
            ok = torch.cat([ok, (own >= 0).expand(b, h, lq)[..., None]], dim=-1)
        idx = block_tokens(regions, r)
        valid = ok.repeat_interleave(r, dim=-1) & (idx < lk)
        valid = valid & real_k.gather(1, idx.clamp(max=lk - 1).reshape(b, -1)).reshape(idx.shape)
        if self.pattern is Pattern.CS:
            valid = valid & (idx <= query_positions(lq, lk, q.device)[:, None])
        return 1, idx, valid[:, :, :, None, :]

    def _query_routes(self, q, k_reg, has_keys, lk):
        """CC: the top-k key regions of each query; CS: the top (k - 1) complete past regions (the own region
        is added by the caller). (regions, valid), each (B, H, Lq, k')."""
        b, h, lq, _ = q.shape
        if self.pattern is Pattern.CS and self.topk == 1:
            empty = torch.zeros(b, h, lq, 0, dtype=torch.long, device=q.device)
            return empty, empty.bool()
        affinity = q @ k_reg.transpose(-1, -2)  # (B, H, Lq, nk): each query routes on its own
        if self.pattern is Pattern.CC:
            return topk_valid(affinity, has_keys[:, :, None, :].expand_as(affinity), self.topk)
        own = torch.div(query_positions(lq, lk, q.device), self.region_size, rounding_mode="floor")
        past = torch.arange(k_reg.shape[2], device=q.device)[None, :] < own[:, None]  # (Lq, nk); none when own < 0
        return topk_valid(affinity, (has_keys[:, :, None, :] & past[None, None]).expand_as(affinity), self.topk - 1)

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq = q.shape[-2]
        if self.pattern in (Pattern.CS, Pattern.CC):
            return self._per_query(q, k, v, key_padding_mask)
        with torch.no_grad():
            group, idx, valid = self._route(q, k, key_padding_mask)
        out = gathered_attention(group_queries(q, group), k, v, idx, valid, softmax_scale(q.shape[-1]))
        return out.flatten(2, 3)[:, :, :lq]

    def _per_query(self, q, k, v, key_padding_mask):
        """CS, CC: one softmax per query over its own region's visible tokens (CS) and its routed regions'
        tokens, merged from per-region log-sum-exps so that the queries routed to a region share one matmul
        with its keys instead of gathering a copy of them per query."""
        lk, r = k.shape[-2], self.region_size
        real_k = real_keys(key_padding_mask, q.shape[0], lk, q.device)
        with torch.no_grad():
            k_reg, k_count = pool_blocks(k.detach(), real_k, r)
            regions, ok = self._query_routes(q.detach(), k_reg, (k_count > 0)[:, None], lk)
        kb, vb, tok_ok = key_blocks(k, r), key_blocks(v, r), key_blocks(real_k, r)
        qs = q * softmax_scale(q.shape[-1])
        lse, values = block_pairs(qs, kb, vb, tok_ok, regions, ok, with_lse=True)
        own = own_block_scores(qs, kb, tok_ok, lk, causal=True) if self.pattern is Pattern.CS else None
        return grouped_softmax(own, vb, lse, values, lk)

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Token pairs scored (the valid gathered ones; the routing affinities are not counted)."""
        k = repeat_kv(k, q.shape[1])
        with torch.no_grad():
            group, idx, valid = self._route(q, k, key_padding_mask)
            return selection_count(valid, group, q.shape[-2])

    # naive formulation ----------------------------------------------------------------------------

    def reference(self, q, k, v, key_padding_mask=None):
        """Routing by explicit per-region (NS, NC) or per-query (CS, CC) loops over region means and a sort,
        then a dense softmax row per query over the tokens of its routed regions."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, _ = q.shape
        lk, r = k.shape[-2], self.region_size
        real_k = real_keys(key_padding_mask, b, lk, q.device).cpu()
        real_q = real_queries(self.pattern, real_k, lq)
        qd, kd = q.detach(), k.detach()
        nk = -(-lk // r)
        allowed = torch.zeros(b, h, lq, lk, dtype=torch.bool)
        offset = lk - lq

        def region_mean(x, real, region):
            rows = [j for j in range(region * r, min((region + 1) * r, x.shape[0])) if real[j]]
            return x[rows].mean(0) if rows else None

        def best(scores: "list[tuple[float, int]]", n: int) -> "list[int]":
            return [reg for _, reg in sorted(scores, key=lambda t: (-t[0], t[1]))[:n]]

        for bi in range(b):
            for hi in range(h):
                keys = [region_mean(kd[bi, hi], real_k[bi], reg) for reg in range(nk)]
                queries = [region_mean(qd[bi, hi], real_q[bi], reg) for reg in range(-(-lq // r))]
                for i in range(lq):
                    if self.pattern in (Pattern.NS, Pattern.NC):
                        qr = queries[i // r]
                        cand = [(float(qr @ keys[g]) if qr is not None else 0.0, g)
                                for g in range(nk) if keys[g] is not None]
                        chosen = best(cand, self.topk)
                    elif self.pattern is Pattern.CC:
                        chosen = best([(float(qd[bi, hi, i] @ keys[g]), g) for g in range(nk) if keys[g] is not None],
                                      self.topk)
                    else:
                        p = i + offset
                        if p < 0:
                            continue
                        own = p // r
                        cand = [(float(qd[bi, hi, i] @ keys[g]), g) for g in range(own) if keys[g] is not None]
                        chosen = best(cand, self.topk - 1) + [own]
                    for g in chosen:  # the region's real keys (CS: up to the query's position)
                        end = min((g + 1) * r, lk, i + offset + 1 if self.pattern is Pattern.CS else lk)
                        allowed[bi, hi, i, g * r: end] = real_k[bi, g * r: end]
        return masked_softmax_reference(q, k, v, allowed.to(q.device), softmax_scale(q.shape[-1]))
