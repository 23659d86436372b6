"""Tree Cross Attention (Feng et al., ICLR 2024): each query retrieves O(log N) nodes of a balanced binary
tree of key/value summaries and cross-attends to them only."""

from __future__ import annotations

import math

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import softmax_scale
from cab.registry import register_attention

_SELF = ("Tree Cross Attention is defined for a query set retrieving from a separate context set (the tree is "
         "built once over the context, before any query); cab keeps it to the cross patterns, as the paper does")
_CS = ("the tree's internal summaries mix every key, so a causal self query would read later tokens; the "
       "paper has no causal self form")


@register_attention(
    "tree_cross", patterns=("NC", "CC"), family="cross", exact=False, mechanism="M62",
    citation="Feng, Tung, Hajimirsadeghi, Bengio and Ahmed, Tree Cross Attention, ICLR 2024",
    unsupported={"NS": _SELF, "CS": _CS},
)
class TreeCrossAttention(Attention):
    """Tree Cross Attention with a greedy score-based descent in place of the paper's learned search policy.

    Tree: the Lk keys (padded to a power of two P) are the leaves of a balanced binary tree; every node holds
    the number n of real (unpadded) keys below it and their mean key k_bar and mean value v_bar (the paper
    aggregates children with a learned Perceiver-style module; the mean is the parameter-free choice [EJ]).
    Padded keys count in no node; an empty node is never retrieved.

    Retrieval per (batch, head, query): start at the root; at each internal node score both children by
    q . k_bar / sqrt(d), descend into the higher one (the left on ties; an empty child never wins) and
    retrieve the other child as a summary; at the bottom retrieve the leaf. That is log2(P) + 1 nodes,
    the paper's "partial representation" (the leaf reached plus the unexpanded siblings along the path,
    which together cover every key). The paper trains the search policy with reinforcement learning
    (ReTreever); here the descent is greedy on the summary scores [BG -> EJ].

    Output: softmax over the retrieved nodes of q . k_bar / sqrt(d) + log n (a node weighs as its n keys
    would if they all scored like their mean [EJ]), weighted sum of their v_bar. Gradients flow to q and,
    through the means, to k and v; the descent itself (an argmax) is not differentiable.

    Patterns: NC and CC. Every query row reads only its own query and the tree of the keys, so CC's
    query-side causality holds by construction; Lq and Lk are independent (no positions are aligned).
    Cost O(Lk D) to build the tree, O(Lq log Lk D) to retrieve; no Lq x Lk tensor. CC decodes with the tree
    as the state (decode_init builds it once).
    """

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    # the tree -------------------------------------------------------------------------------------------

    @staticmethod
    def build_tree(k, v, key_padding_mask):
        """Levels from the leaves up: list of (count (B, H, n), key sum (B, H, n, D), value sum (B, H, n, Dv))."""
        batch, heads, lk, _ = k.shape
        size = 1 << max(0, math.ceil(math.log2(max(lk, 1))))
        real = torch.ones(batch, lk, dtype=k.dtype, device=k.device)
        if key_padding_mask is not None:
            real = (~key_padding_mask.bool()).to(k.dtype).to(k.device)
        count = torch.nn.functional.pad(real, (0, size - lk))[:, None].expand(batch, heads, size)
        ksum = torch.nn.functional.pad(k * real[:, None, :, None], (0, 0, 0, size - lk))
        vsum = torch.nn.functional.pad(v * real[:, None, :, None], (0, 0, 0, size - lk))
        levels = [(count, ksum, vsum)]
        while count.shape[-1] > 1:
            count = count.view(batch, heads, -1, 2).sum(-1)
            ksum = ksum.view(batch, heads, -1, 2, ksum.shape[-1]).sum(-2)
            vsum = vsum.view(batch, heads, -1, 2, vsum.shape[-1]).sum(-2)
            levels.append((count, ksum, vsum))
        return levels

    @staticmethod
    def _node(level, idx):
        """(count, mean key, mean value) of the nodes `idx` (B, H, Lq) of one level."""
        count, ksum, vsum = level
        n = count.gather(-1, idx)
        ks = ksum.gather(-2, idx[..., None].expand(*idx.shape, ksum.shape[-1]))
        vs = vsum.gather(-2, idx[..., None].expand(*idx.shape, vsum.shape[-1]))
        denom = n.clamp(min=1)[..., None]
        return n, ks / denom, vs / denom

    def retrieve(self, q, levels):
        """The attention output of queries q (B, H, Lq, D) over the tree `levels`."""
        batch, heads, lq, dim = q.shape
        scale = softmax_scale(dim)
        idx = torch.zeros(batch, heads, lq, dtype=torch.long, device=q.device)
        counts, keys, values = [], [], []
        for level in reversed(levels[:-1]):  # the children's level, from just below the root to the leaves
            n0, k0, v0 = self._node(level, 2 * idx)
            n1, k1, v1 = self._node(level, 2 * idx + 1)
            with torch.no_grad():
                s0 = ((q * k0).sum(-1) * scale).masked_fill(n0 == 0, float("-inf"))
                s1 = ((q * k1).sum(-1) * scale).masked_fill(n1 == 0, float("-inf"))
                right = s1 > s0
            r = right[..., None]
            counts.append(torch.where(right, n0, n1))  # the sibling not taken
            keys.append(torch.where(r, k0, k1))
            values.append(torch.where(r, v0, v1))
            idx = 2 * idx + right.long()
        n, kb, vb = self._node(levels[0], idx)  # the leaf reached
        counts.append(n)
        keys.append(kb)
        values.append(vb)
        n = torch.stack(counts, -1)  # (B, H, Lq, depth + 1)
        scores = torch.einsum("bhid,bhind->bhin", q * scale, torch.stack(keys, -2))
        scores = scores + torch.log(n.clamp(min=1))
        ok = n > 0
        probs = torch.softmax(scores.masked_fill(~ok, torch.finfo(scores.dtype).min), -1) * ok.any(-1, keepdim=True)
        return torch.einsum("bhin,bhind->bhid", probs, torch.stack(values, -2))

    def forward(self, q, k, v, key_padding_mask=None):
        heads = q.shape[1]
        k, v = repeat_kv(k, heads), repeat_kv(v, heads)
        return self.retrieve(q, self.build_tree(k, v, key_padding_mask))

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """(batch, head, query, node) scores: 2 per tree level on the way down plus the retrieved set."""
        depth = max(0, math.ceil(math.log2(max(k.shape[-2], 1))))
        return q.shape[0] * q.shape[1] * q.shape[-2] * (2 * depth + depth + 1)

    # decoding (CC): the tree of the memory is the state --------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        return self.build_tree(repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads), key_padding_mask)

    def decode_step(self, state, q, k=None, v=None):
        return self.retrieve(q, state), state

    # the naive form --------------------------------------------------------------------------------------

    def reference(self, q, k, v, key_padding_mask=None):
        """Per (batch, head): every node as an explicit key index range [lo, hi) with the mean key and value
        of its real keys; per query: the descent over those ranges, one softmax over the retrieved nodes."""
        heads = q.shape[1]
        k, v = repeat_kv(k, heads), repeat_kv(v, heads)
        batch, _, lq, dim = q.shape
        lk = k.shape[-2]
        size = 1 << max(0, math.ceil(math.log2(max(lk, 1))))
        ranges, width = [], size
        while width >= 1:
            ranges += [(lo, lo + width) for lo in range(0, size, width)]
            width //= 2
        where = {r: n for n, r in enumerate(ranges)}
        rows = []
        for b in range(batch):
            real = [j for j in range(lk) if key_padding_mask is None or not bool(key_padding_mask[b, j])]
            members = [[j for j in real if lo <= j < hi] for lo, hi in ranges]
            count = [len(ids) for ids in members]
            for h in range(heads):
                kbar = torch.stack([k[b, h, ids].mean(0) if ids else k.new_zeros(dim) for ids in members])
                vbar = torch.stack([v[b, h, ids].mean(0) if ids else v.new_zeros(v.shape[-1]) for ids in members])
                for i in range(lq):
                    scores = kbar @ q[b, h, i] / math.sqrt(dim)
                    plain = scores.detach().tolist()
                    if not count[0]:
                        rows.append(q.new_zeros(v.shape[-1]))
                        continue
                    retrieved, lo, hi = [], 0, size
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        left, right = where[(lo, mid)], where[(mid, hi)]
                        go_right = count[right] > 0 and (count[left] == 0 or plain[right] > plain[left])
                        other = left if go_right else right
                        if count[other]:
                            retrieved.append(other)
                        lo, hi = (mid, hi) if go_right else (lo, mid)
                    retrieved.append(where[(lo, hi)])
                    logn = torch.tensor([math.log(count[n]) for n in retrieved], dtype=q.dtype, device=q.device)
                    weights = torch.softmax(scores[retrieved] + logn, 0)
                    rows.append(weights @ vbar[retrieved])
        return torch.stack(rows).view(batch, heads, lq, -1)
