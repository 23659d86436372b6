"""Kronecker (tensor, triple-wise) attention: each query attends to *pairs* of keys, softmax over the Lk^2
pairs of exp(<q_i, k_j1 (.) k_j2>), aggregating the column-wise Kronecker product of the values. O(Lq Lk^2 d)
time and O(C Lk^2) memory per query block: for small sizes only (it declares its peak memory so sweeps
skip cells that cannot fit)."""

from __future__ import annotations

import math

import torch

from cab.attention.base import repeat_kv
from cab.attention.engine.kv_cache import KVCacheAttention
from cab.attention.engine.masks import query_offset
from cab.attention.engine.prepare import compute_dtype, grouped_compute, set_positive
from cab.attention.engine.scores import blocked_inputs, blocked_rows, cached_block, reference_rows
from cab.patterns import Pattern
from cab.registry import register_attention


@register_attention(
    "triple_wise_attention", patterns=("NS", "CS", "NC", "CC"), family="softmax-variant", exact=False,
    mechanism="M59",
    citation="Alman & Song, How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to "
    "Kronecker Computation, ICLR 2024",
)
class TripleWiseAttention(KVCacheAttention):
    """Tensor attention (the paper's generalisation of D^-1 exp(QK^T) V to triple-wise correlations):

        A_{i,(j1,j2)} = exp(<q_i, k_j1 (.) k_j2> / sqrt(d))        over pairs of visible keys j1, j2
        o_i = sum_{j1,j2} A_{i,(j1,j2)} (v_j1 (.) v_j2) / sum_{j1,j2} A_{i,(j1,j2)}

    ((.) elementwise; (V1 (/) V2) in the paper is the column-wise Kronecker product whose row (j1, j2) is
    v1_j1 (.) v2_j2.) [EJ] The paper's two key sets K1, K2 and value sets V1, V2 are both the operator's
    one k and v here (triple-wise self-correlation of query i with token pairs; a pair is visible when both
    of its keys are), and the trilinear score is scaled by 1/sqrt(d), which gives it unit variance on
    N(0, 1) inputs. No approximation: the paper's almost-linear algorithm needs entries bounded by
    o(cbrt(log n)) and is a theoretical construction; this is the exact cubic computation.

    Efficient form: query blocks of `chunk_size` rows; a block's (C, K, K) pair scores come from one matmul
    (q_i (.) k_j1) @ K^T, and the value sum factors as sum_j1 v_j1 (.) (sum_j2 w_{j1 j2} v_j2), so no
    (.., K^2, d) value tensor is formed. Causal self: both keys at or before the query (bottom-right
    alignment), keys past the block's last row never scored. Memory bound: about 4 * B * H * C * Lk^2
    elements per call (the pair scores, their softmax, and checkpointed recomputation in the backward),
    e.g. B=1, H=8, C=16, Lk=1024 in float32: 2 GiB; Lk=4096: 32 GiB — `peak_memory_estimate` declares it so
    a sweep's `max_memory_bytes` skips what cannot fit, and `algorithmic_flops` (4 B H Lq Lk^2 d) lets a
    FLOP budget skip long cells. Decoding (CS, CC) scores the query against all cached key pairs,
    O(n^2 d) per step. Differentiable everywhere.
    """

    complexity = {"time": 3, "memory": 2}

    def __init__(self, pattern, num_heads, head_dim, chunk_size: int = 16):
        super().__init__(pattern, num_heads, head_dim)
        set_positive(self, chunk_size=chunk_size)

    def _block(self, q, k, v, visible):
        """q (B, H, R, D), k, v (B, H, K, D), visible (B|1, 1, R, K) -> (B, H, R, D)."""
        b, h, r, d = q.shape
        kn = k.shape[-2]
        opened = visible | ~visible.any(dim=-1, keepdim=True)
        pair_visible = opened.unsqueeze(-1) & opened.unsqueeze(-2)  # (B|1, 1, R, K, K)
        qk = (q.unsqueeze(-2) * k.unsqueeze(-3)).reshape(b, h, r * kn, d)  # q_i (.) k_j1
        scores = (qk @ k.transpose(-1, -2)).reshape(b, h, r, kn, kn) / math.sqrt(d)
        scores = scores.masked_fill(~pair_visible, float("-inf"))
        weights = torch.softmax(scores.reshape(b, h, r, kn * kn), dim=-1).reshape(b, h, r * kn, kn)
        inner = (weights @ v).reshape(b, h, r, kn, -1)  # sum_j2 w_{i j1 j2} v_j2
        return (inner * v.unsqueeze(-3)).sum(dim=-2)  # sum_j1 v_j1 (.) inner

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_ok, offset, out_dtype = blocked_inputs(self.pattern, q, k, v, key_padding_mask)
        use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        out = blocked_rows(self._block, q, k, v, self.pattern, key_ok, offset, self.chunk_size, use_ckpt)
        return out.to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row over the visible keys: the (n, n) trilinear scores of every pair (j1, j2) as one
        einsum, softmax over the n^2 pairs, sum of w * (v_j1 (.) v_j2) as another."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])

        def row(b, i, idx):
            kb, vb = k[b][:, idx], v[b][:, idx]  # (H, n, D)
            scores = torch.einsum("hc,hjc,hkc->hjk", q[b, :, i], kb, kb) / math.sqrt(q.shape[-1])  # every pair
            weights = torch.softmax(scores.flatten(1), dim=-1).view_as(scores)
            return torch.einsum("hjk,hjc,hkc->hc", weights, vb, vb)

        return reference_rows(self.pattern, q, k.shape[-2], v.shape[-1], key_padding_mask, row)

    def attend_cached(self, q, keys, values, real):
        _, keys, values, _ = grouped_compute(q, keys, values)
        return cached_block(self._block, q, keys, values, real)

    # costs -------------------------------------------------------------------------------------------

    def _blocks(self, lq: int, lk: int):
        offset = query_offset(self.pattern, lq, lk)
        for qs in range(0, lq, self.chunk_size):
            qe = min(lq, qs + self.chunk_size)
            kend = min(lk, qe + offset) if self.pattern is Pattern.CS else lk
            if kend > 0:
                yield qe - qs, kend

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """Per block: (q (.) k) @ K^T and W @ V, 2 B H R K^2 d each."""
        return sum(4 * batch * self.num_heads * rows * keys * keys * self.head_dim
                   for rows, keys in self._blocks(lq, lk))

    def peak_memory_estimate(self, batch, lq, lk, kv_heads, mode, dtype):
        """The largest block's pair tensors — scores, softmax, the masked copy and the bool pair mask, twice
        over in the backward's recomputation — plus (B, H, C, K, D) products and the O(L d) tensors."""
        item = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        rows, keys = max(self._blocks(lq, lk), default=(0, 0), key=lambda rk: rk[0] * rk[1] ** 2)
        pairs = batch * self.num_heads * rows * keys * keys
        per_block = (3 * item + 1) * pairs + 3 * batch * self.num_heads * rows * keys * self.head_dim * item
        factor = 2 if mode in ("bwd", "fwdbwd") else 1
        linear = 6 * batch * self.num_heads * max(lq, lk) * self.head_dim * item
        return int(factor * per_block + linear)
