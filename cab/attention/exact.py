"""Exact softmax attention: the eager oracle (`vanilla`), PyTorch's fused kernel (`sdpa`) and the
chunked O(L)-memory algorithm of "Self-attention Does Not Need O(n^2) Memory" (`memory_efficient`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cab.attention.base import Attention, repeat_kv
from cab.attention.functional import softmax_scale, zero_empty_rows
from cab.patterns import Pattern, visibility_mask
from cab.registry import register_attention

ALL_PATTERNS = ("NS", "CS", "NC", "CC")


def eager_attention(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None"
) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + M) V with the full score matrix materialised."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    mask, empty = attn.visible(q.shape[-2], k.shape[-2], key_padding_mask, q.device)
    scores = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return zero_empty_rows(torch.softmax(scores, dim=-1) @ v, empty)


@register_attention(
    "vanilla", patterns=ALL_PATTERNS, family="exact", exact=True, mechanism="M1",
    citation="Vaswani et al., Attention Is All You Need, NeurIPS 2017",
)
class VanillaAttention(Attention):
    """Eager softmax attention materialising the L x L score matrix; in float64 it is cab's oracle."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        return eager_attention(self, q, k, v, key_padding_mask)


@register_attention(
    "sdpa", patterns=ALL_PATTERNS, family="exact", exact=True, mechanism="M2",
    citation="PyTorch scaled_dot_product_attention (fused FlashAttention-style kernels); "
    "Dao et al., FlashAttention-2, ICLR 2024",
)
class SDPAttention(Attention):
    """`torch.nn.functional.scaled_dot_product_attention`: the fused exact kernel on CPU and GPU.

    `is_causal` is top-left aligned when Lq != Lk, so it is used only for square causal self attention;
    other causal shapes and key padding pass an explicit boolean mask. CC needs no mask (each query row
    is computed independently of the others)."""

    def __init__(self, pattern, num_heads, head_dim):
        super().__init__(pattern, num_heads, head_dim)

    def forward(self, q, k, v, key_padding_mask=None):
        lq, lk = q.shape[-2], k.shape[-2]
        gqa = k.shape[1] != q.shape[1]
        if key_padding_mask is None and (self.pattern is not Pattern.CS or lq == lk):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.pattern is Pattern.CS, enable_gqa=gqa)
        mask, empty = self.visible(lq, lk, key_padding_mask, q.device)
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


@register_attention(
    "memory_efficient", patterns=ALL_PATTERNS, family="exact", exact=True, mechanism="M3",
    citation="Rabe & Staats, Self-attention Does Not Need O(n^2) Memory, arXiv 2112.05682 (2021)",
)
class MemoryEfficientAttention(Attention):
    """Exact attention in query and key chunks with a running max and sum (O(L) memory).

    Each (query chunk, key chunk) summary is checkpointed, so the backward pass recomputes the chunk's
    scores instead of storing them, as in the paper. Key chunks entirely above the causal diagonal are
    skipped. Defaults follow the paper: query chunks of 1024, key chunks of 4096."""

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
                if causal:
                    mask = visibility_mask(Pattern.CS, lq, lk, device=q.device)[qs:qe, ks:ke]
                if pad is not None:
                    keep = ~pad[..., ks:ke]
                    mask = keep if mask is None else (mask & keep)
                args = (q_chunk, kg[..., ks:ke, :], vg[..., ks:ke, :], mask, scale)
                if use_ckpt:
                    out_c, sum_c, max_c = checkpoint(_chunk_summary, *args, use_reentrant=False)
                else:
                    out_c, sum_c, max_c = _chunk_summary(*args)
                new_max = torch.maximum(run_max, max_c)
                safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
                old_w, new_w = torch.exp(run_max - safe), torch.exp(max_c - safe)
                acc = acc * old_w + out_c.to(acc_dtype) * new_w
                total = total * old_w + sum_c.to(acc_dtype) * new_w
                run_max = new_max
            outputs.append(torch.where(total > 0, acc / total.clamp_min(torch.finfo(acc_dtype).tiny), 0.0))
        out = torch.cat(outputs, dim=-2) if len(outputs) > 1 else outputs[0]
        return out.reshape(b, hq, lq, v.shape[-1]).to(q.dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        return eager_attention(self, q, k, v, key_padding_mask)
