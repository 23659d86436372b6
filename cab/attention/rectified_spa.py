"""Rectified SpaAttn: block-sparse attention whose critical blocks are reweighted by their pooled attention
mass and whose non-critical blocks are recovered from pooled query-key attention over pooled values."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import real_keys, real_queries, softmax_scale
from cab.attention.engine.routing import (
    block_tokens,
    gathered_attention,
    group_queries,
    pool_blocks,
    selection_count,
    topk_valid,
)
from cab.registry import register_attention

_CAUSAL = ("the pooled query and key blocks that select and rectify mix every token of a block, so a "
           "query would read later queries and keys; the method targets bidirectional video DiT attention")


@register_attention(
    "rectified_spa", patterns=("NS", "NC"), family="sparse", exact=False, mechanism="M45",
    citation="Liu et al., Rectified SpaAttn: Revisiting Attention Sparsity for Efficient Video Generation, "
    "arXiv preprint 2025",
    unsupported={"CS": _CAUSAL, "CC": _CAUSAL},
)
class RectifiedSpaAttention(Attention):
    """Rectified sparse attention (Liu et al. 2025), [BG] reading of its two rectifications.

    Queries and keys are cut into blocks of `block_size` (from position 0). Pooled attention: with Qbar_a,
    Kbar_b, Vbar_b the means of block a's real queries and block b's real keys and values and n_b the
    number of real keys in b, P~[a, b] = softmax_b(Qbar_a . Kbar_b / sqrt(d) + log n_b) is the block-level
    estimate of the share of query block a's attention that falls in key block b. The `topk` key blocks
    with the largest P~ are critical for query block a; the rest are non-critical. For query i in block a:
        o_i = alpha_a * softmax-attention of q_i over the critical blocks' keys
              + sum_{b non-critical} P~[a, b] Vbar_b,      alpha_a = sum_{b critical} P~[a, b].
    - Isolated-Pooling Attention Reallocation: plain block-sparse attention renormalises over the critical
      blocks, so their weights sum to 1 and are overestimated; they are rescaled to the pooled mass alpha_a
      those blocks actually hold.
    - Gain-Aware Pooling Rectification: the non-critical blocks, dropped by plain sparse attention, get
      back their pooled mass, each contributing its mean value. [BG] The paper applies this only where
      its estimated gain exceeds the pooling error; that criterion is not reproduced: every non-critical
      block is rectified (set `rectify=False` for IPAR alone).
    Defaults: block_size = 128 (the paper's block), topk = 8 critical blocks per query block.

    Patterns: NS and NC (cross queries are blocked on their own axis); CS and CC are unsupported (see the
    reason). Padded keys are left out of every pool, padded self queries out of the query pool; a key
    block without real keys gets no mass. Selection (top-k) is not differentiable; alpha, P~ and the
    pooled terms are (through the pooled means).

    Cost: pooled O((Lq / b)(Lk / b) d) plus the sparse part O(Lq topk b d) (gathered per query block in
    chunks); no Lq x Lk tensor. No FlexAttention path: the output is not a masked softmax (the critical part
    is rescaled and pooled terms are added).
    """

    # the pooled block attention is (L/b)^2 for a fixed block size
    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, block_size: int = 128, topk: int = 8, rectify: bool = True):
        super().__init__(pattern, num_heads, head_dim)
        if block_size < 1 or topk < 1:
            raise ValueError(f"block_size and topk must be positive, got {block_size} and {topk}")
        self.block_size, self.topk, self.rectify = block_size, topk, rectify

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, topk={self.topk}, rectify={self.rectify}"

    def _pooled(self, q, k, v, key_padding_mask):
        b, h, lq, d = q.shape
        lk, bs = k.shape[-2], self.block_size
        real_k = real_keys(key_padding_mask, b, lk, q.device)
        real_q = real_queries(self.pattern, real_k, lq)
        q_reg, _ = pool_blocks(q, real_q, bs)
        k_reg, counts = pool_blocks(k, real_k, bs)
        v_reg, _ = pool_blocks(v, real_k, bs)
        has = (counts > 0)[:, None, None, :]
        log_counts = torch.log(counts.clamp_min(1).to(q.dtype))[:, None, None, :]
        logits = (q_reg @ k_reg.transpose(-1, -2)) * softmax_scale(d) + log_counts
        logits = logits.masked_fill(~has, float("-inf"))
        # a batch element without real keys has no key block at all: its rows' logits are all -inf and a
        # plain softmax would give 0/0 = NaN (in the forward and the backward). Such rows get finite logits
        # (the untaken -inf branch of the where receives no gradient) and zero probabilities, so P~ = 0,
        # alpha = 0, no rectification and, with the sparse part empty too, an exact zero output.
        any_block = has.any(dim=-1, keepdim=True)
        probs = torch.softmax(torch.where(any_block, logits, torch.zeros_like(logits)), dim=-1) * any_block
        return real_k, probs, logits, v_reg, has

    def _select(self, logits, has, lk, real_k):
        b = logits.shape[0]
        blocks, ok = topk_valid(logits.detach(), has.expand_as(logits), self.topk)
        idx = block_tokens(blocks, self.block_size)
        valid = ok.repeat_interleave(self.block_size, dim=-1) & (idx < lk)
        valid = valid & real_k.gather(1, idx.clamp(max=lk - 1).reshape(b, -1)).reshape(idx.shape)
        return blocks, ok, idx, valid

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk, bs = q.shape[-2], k.shape[-2], self.block_size
        real_k, probs, logits, v_reg, has = self._pooled(q, k, v, key_padding_mask)
        with torch.no_grad():
            blocks, ok, idx, valid = self._select(logits, has, lk, real_k)
        sparse = gathered_attention(group_queries(q, bs), k, v, idx, valid[:, :, :, None, :],
                                    softmax_scale(q.shape[-1]))
        critical = torch.zeros_like(probs).scatter(-1, blocks, ok.to(probs.dtype))  # (B, H, nq, nk)
        alpha = (probs * critical).sum(-1)
        out = alpha[..., None, None] * sparse
        if self.rectify:
            out = out + ((probs * (1 - critical)) @ v_reg)[:, :, :, None, :]
        return out.flatten(2, 3)[:, :, :lq]

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Token pairs of the sparse (critical) part; the pooled block pairs are not counted."""
        k = repeat_kv(k, q.shape[1])
        with torch.no_grad():
            real_k, _, logits, _, has = self._pooled(q, k, k, key_padding_mask)
            _, _, idx, valid = self._select(logits, has, k.shape[-2], real_k)
            return selection_count(valid[:, :, :, None, :], self.block_size, q.shape[-2])

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row: explicit block means and counts, the pooled softmax of the row's block, an explicit
        sort for the critical blocks, a dense softmax over their keys, and the explicit rectification sum."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk, bs, scale = k.shape[-2], self.block_size, softmax_scale(d)
        real_k = real_keys(key_padding_mask, b, lk, q.device).cpu()
        real_q = real_queries(self.pattern, real_k, lq)
        out = torch.zeros(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
        for bi in range(b):
            kblocks = [[j for j in range(c * bs, min((c + 1) * bs, lk)) if real_k[bi, j]] for c in range(-(-lk // bs))]
            kblocks = [(c, m) for c, m in enumerate(kblocks) if m]
            for hi in range(h):
                for a in range(-(-lq // bs)):
                    rows = [i for i in range(a * bs, min((a + 1) * bs, lq)) if real_q[bi, i]]
                    qbar = q[bi, hi, rows].mean(0) if rows else torch.zeros_like(q[bi, hi, 0])
                    logit = torch.stack([(qbar @ k[bi, hi, m].mean(0)) * scale
                                         + torch.log(torch.tensor(float(len(m)), dtype=q.dtype))
                                         for _, m in kblocks])
                    p = torch.softmax(logit, 0)
                    ranked = sorted(range(len(kblocks)), key=lambda n: (-float(logit[n].detach()), kblocks[n][0]))
                    crit = set(ranked[: self.topk])
                    keys = [j for n in sorted(crit) for j in kblocks[n][1]]
                    alpha = sum(p[n] for n in crit)
                    rest = sum((p[n] * v[bi, hi, kblocks[n][1]].mean(0) for n in range(len(kblocks)) if n not in crit),
                               torch.zeros_like(v[bi, hi, 0]))
                    for i in range(a * bs, min((a + 1) * bs, lq)):
                        w = torch.softmax((k[bi, hi, keys] @ q[bi, hi, i]) * scale, 0)
                        out[bi, hi, i] = alpha * (w @ v[bi, hi, keys]) + (rest if self.rectify else 0)
        return out
