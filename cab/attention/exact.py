"""Exact softmax attention: the eager oracle (`vanilla`), PyTorch's fused kernel (`sdpa`) and the
chunked O(L)-memory algorithm of "Self-attention Does Not Need O(n^2) Memory" (`memory_efficient`).

All three decode incrementally from a KV cache (`KVCache`): causal self appends each new token's key and
value to a buffer allocated once; causal cross keeps the memory as it is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cab.attention.engine.kv_cache import KVCacheAttention, grouped_queries, no_real_key
from cab.attention.engine.prepare import softmax_scale, zero_empty_rows
from cab.attention.engine.scores import dense_matmul_flops, masked_softmax_attention
from cab.patterns import Pattern
from cab.registry import register_attention

ALL_PATTERNS = ("NS", "CS", "NC", "CC")


@register_attention(
    "vanilla", patterns=ALL_PATTERNS, family="exact", exact=True, mechanism="M1,M5",
    citation="Vaswani et al., Attention Is All You Need, NeurIPS 2017",
)
class VanillaAttention(KVCacheAttention):
    """Eager softmax attention materialising the L x L score matrix; in float64 it is cab's oracle. Takes
    segment_ids (packed sequences, self patterns) through the mask: the segment-wise reference."""

    complexity = {"time": 2, "memory": 2}
    supports_segments = True
    # score-sized (B, Hq, Lq, Lk) tensors alive at the peak of one call, measured with cab's memory probe
    # (2.1 in fwd and fwd_infer, 3.1 when the backward runs), rounded up
    SCORE_MATRICES = {"fwd": 2.25, "fwd_infer": 2.25, "bwd": 3.25, "fwdbwd": 3.25}

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None, *, segment_ids=None):
        return masked_softmax_attention(self, q, k, v, key_padding_mask, self.segments(segment_ids, q, k))

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        return dense_matmul_flops(batch, self.num_heads, lq, lk, self.head_dim, self.head_dim)

    def peak_memory_estimate(self, batch, lq, lk, kv_heads, mode, dtype):
        itemsize = torch.empty((), dtype=dtype).element_size()
        scores = batch * self.num_heads * lq * lk * itemsize
        rows = 4 * batch * self.num_heads * max(lq, lk) * self.head_dim * itemsize  # repeated k, v; output
        return int(self.SCORE_MATRICES[mode] * scores + lq * lk + rows)  # + the bool visibility mask

    def attend_cached(self, q, keys, values, real):
        b, hq, _, d = q.shape
        scores = (grouped_queries(q, keys.shape[1]) @ keys.unsqueeze(2).transpose(-1, -2)) * softmax_scale(d)
        empty = no_real_key(real)
        if real is not None:
            visible = real if empty is None else real | empty[:, None]
            scores = scores.masked_fill(~visible[:, None, None, None, :], float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ values.unsqueeze(2)).reshape(b, hq, 1, values.shape[-1])
        return out if empty is None else out.masked_fill(empty[:, None, None, None], 0.0)


@register_attention(
    "sdpa", patterns=ALL_PATTERNS, family="exact", exact=True, mechanism="M2,M5",
    citation="PyTorch scaled_dot_product_attention (fused FlashAttention-style kernels); "
    "Dao et al., FlashAttention-2, ICLR 2024",
)
class SDPAttention(KVCacheAttention):
    """`torch.nn.functional.scaled_dot_product_attention`: the fused exact kernel on CPU and GPU.

    `is_causal` is top-left aligned when Lq != Lk, so it is used only for square causal self attention;
    other causal shapes and key padding pass an explicit boolean mask. CC needs no mask (each query row
    is computed independently of the others). segment_ids (packed sequences, self patterns) become part of
    the explicit mask."""

    complexity = {"time": 2, "memory": 1}
    supports_segments = True

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """The math formulation's count over the full score matrix (what FlopCounterMode sees with the
        math backend; a fused kernel may skip causal blocks that are entirely masked)."""
        return dense_matmul_flops(batch, self.num_heads, lq, lk, self.head_dim, self.head_dim)

    def attend_cached(self, q, keys, values, real):
        gqa = keys.shape[1] != q.shape[1]
        empty = no_real_key(real)
        if real is None:
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        visible = real if empty is None else real | empty[:, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :], enable_gqa=gqa)
        return out if empty is None else out.masked_fill(empty[:, None, None, None], 0.0)

    def forward(self, q, k, v, key_padding_mask=None, *, segment_ids=None):
        lq, lk = q.shape[-2], k.shape[-2]
        gqa = k.shape[1] != q.shape[1]
        segment_ids = self.segments(segment_ids, q, k)
        if key_padding_mask is None and segment_ids is None and (self.pattern is not Pattern.CS or lq == lk):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.pattern is Pattern.CS, enable_gqa=gqa)
        mask, empty = self.visible(lq, lk, key_padding_mask, q.device, segment_ids)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return zero_empty_rows(out, empty)


def _chunk_summary(q, k, v, mask, scale):
    """(unnormalised output, row sum, row max) of one query chunk against one key chunk."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - safe_max)
    return weights @ v, weights.sum(dim=-1, keepdim=True), row_max


def _merge_chunk(acc, total, run_max, out_c, sum_c, max_c):
    """Fold one key chunk's (output, sum, max) into the running (acc, total, max) of the online softmax."""
    new_max = torch.maximum(run_max, max_c)
    safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
    old_w, new_w = torch.exp(run_max - safe), torch.exp(max_c - safe)
    return acc * old_w + out_c.to(acc.dtype) * new_w, total * old_w + sum_c.to(total.dtype) * new_w, new_max


@register_attention(
    "memory_efficient", patterns=ALL_PATTERNS, family="exact", exact=True, mechanism="M3,M5",
    citation="Rabe & Staats, Self-attention Does Not Need O(n^2) Memory, arXiv 2112.05682 (2021)",
)
class MemoryEfficientAttention(KVCacheAttention):
    """Exact attention in query and key chunks with a running max and sum (O(L) memory).

    Each (query chunk, key chunk) summary is checkpointed, so the backward pass recomputes the chunk's
    scores instead of storing them, as in the paper. Key chunks entirely above the causal diagonal are
    skipped. Defaults follow the paper: query chunks of 1024, key chunks of 4096. A decoding step streams
    its one query over the cached keys in key chunks (the paper's single-query algorithm)."""

    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, query_chunk_size: int = 1024, key_chunk_size: int = 4096):
        super().__init__(pattern, num_heads, head_dim)
        if query_chunk_size < 1 or key_chunk_size < 1:
            raise ValueError("chunk sizes must be positive")
        self.query_chunk_size = query_chunk_size
        self.key_chunk_size = key_chunk_size

    def forward(self, q, k, v, key_padding_mask=None):
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[-2]
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        group = hq // hkv
        # (B, Hkv, G, L, D): the query heads sharing one key/value head, without copying k and v
        qg = q.reshape(b, hkv, group, lq, d)
        kg, vg = k.unsqueeze(2), v.unsqueeze(2)
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        scale = softmax_scale(d)
        causal = self.pattern is Pattern.CS
        pad = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, None, :]
        use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        outputs = []
        for qs in range(0, lq, self.query_chunk_size):
            qe = min(lq, qs + self.query_chunk_size)
            q_chunk = qg[..., qs:qe, :]
            acc = torch.zeros(b, hkv, group, qe - qs, v.shape[-1], dtype=acc_dtype, device=q.device)
            total = torch.zeros(b, hkv, group, qe - qs, 1, dtype=acc_dtype, device=q.device)
            run_max = torch.full_like(total, float("-inf"))
            for ks in range(0, lk, self.key_chunk_size):
                ke = min(lk, ks + self.key_chunk_size)
                if causal and ks > qe - 1 + (lk - lq):
                    break  # every later key chunk is in the future of every query of this chunk
                mask = None
                if causal:  # built for this chunk alone: a view of a full mask would keep L x L alive
                    rows = torch.arange(qs, qe, device=q.device).unsqueeze(1) + (lk - lq)
                    mask = torch.arange(ks, ke, device=q.device).unsqueeze(0) <= rows
                if pad is not None:
                    keep = ~pad[..., ks:ke]
                    mask = keep if mask is None else (mask & keep)
                args = (q_chunk, kg[..., ks:ke, :], vg[..., ks:ke, :], mask, scale)
                if use_ckpt:
                    out_c, sum_c, max_c = checkpoint(_chunk_summary, *args, use_reentrant=False)
                else:
                    out_c, sum_c, max_c = _chunk_summary(*args)
                acc, total, run_max = _merge_chunk(acc, total, run_max, out_c, sum_c, max_c)
            outputs.append(torch.where(total > 0, acc / total.clamp_min(torch.finfo(acc_dtype).tiny), 0.0))
        out = torch.cat(outputs, dim=-2) if len(outputs) > 1 else outputs[0]
        return out.reshape(b, hq, lq, v.shape[-1]).to(q.dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        return masked_softmax_attention(self, q, k, v, key_padding_mask)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """QK^T and PV of every (query chunk, key chunk) pair the forward visits."""
        total = 0
        for qs in range(0, lq, self.query_chunk_size):
            qe = min(lq, qs + self.query_chunk_size)
            for ks in range(0, lk, self.key_chunk_size):
                if self.pattern is Pattern.CS and ks > qe - 1 + (lk - lq):
                    break
                ke = min(lk, ks + self.key_chunk_size)
                total += dense_matmul_flops(batch, self.num_heads, qe - qs, ke - ks, self.head_dim, self.head_dim)
        return total

    def attend_cached(self, q, keys, values, real):
        b, hq, _, d = q.shape
        qg, acc_dtype = grouped_queries(q, keys.shape[1]), torch.promote_types(q.dtype, torch.float32)
        acc = torch.zeros(*qg.shape[:-1], values.shape[-1], dtype=acc_dtype, device=q.device)
        total = torch.zeros(*qg.shape[:-1], 1, dtype=acc_dtype, device=q.device)
        run_max = torch.full_like(total, float("-inf"))
        for ks in range(0, keys.shape[-2], self.key_chunk_size):
            ke = min(keys.shape[-2], ks + self.key_chunk_size)
            mask = None if real is None else real[:, None, None, None, ks:ke]
            out_c, sum_c, max_c = _chunk_summary(qg, keys[:, :, None, ks:ke], values[:, :, None, ks:ke], mask,
                                                 softmax_scale(d))
            acc, total, run_max = _merge_chunk(acc, total, run_max, out_c, sum_c, max_c)
        out = torch.where(total > 0, acc / total.clamp_min(torch.finfo(acc_dtype).tiny), 0.0)
        return out.reshape(b, hq, 1, values.shape[-1]).to(q.dtype)
