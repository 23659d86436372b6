"""LongVQ's vector-quantized attention (M25): keys snapped to the nearest of S learned codewords, so softmax
attention factors through the codebook and costs O(L S d) instead of O(L^2 d)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prefix_sums import pattern_linear_attention
from cab.attention.engine.prepare import compute_dtype, nonzero, prepare, softmax_scale, zero_empty_rows
from cab.patterns import Pattern
from cab.registry import register_attention


@dataclass(frozen=True)
class CodebookState:
    """Decoding state: per codeword the sum of the values assigned to it, U (B, H, S, Dv), and their count
    n (B, H, S), over the prefix (CS) or the memory (CC)."""

    values: torch.Tensor
    counts: torch.Tensor


@register_attention(
    "longvq", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M25",
    citation="Liu et al., LongVQ: Long Sequence Modeling with Vector Quantization on Structured Memory, IJCAI 2024",
)
class LongVQAttention(Attention):
    """Vector-quantized key attention of LongVQ (Liu et al. 2024, the "VQ-equipped attention", after
    Transformer-VQ, Lingle 2023): each key is replaced by its nearest codeword,

        z_j = argmin_s |k_j - c_s|^2,   out_i = sum_j exp(q_i . c_{z_j} / sqrt(d)) v_j / sum_j exp(...),

    i.e. exact softmax attention over the quantized keys. Because a key's score depends on it only through
    z_j, the sums factor through the codebook: out_i = sum_s exp(q_i . c_s / sqrt(d)) U_s / sum_s exp(...) n_s
    with U_s the sum of the values assigned to codeword s and n_s their count. That is a linear attention
    with query features exp(q . C^T / sqrt(d)) (S of them, shifted by their row maximum, which cancels) and
    one-hot key features, so NS/NC use the global sums, CS the chunked prefix sums of
    cab.attention.functional (bottom-right aligned when Lq != Lk) and CC the global sums too (each row uses
    only its own query). Cost O(L S d), state O(S d) per head.

    [BG] What was implemented of LongVQ: its attention operator only. The block's gated SSM branch, the
    local-window bias and the "dynamic fixed-size memory" of the causal language model are module-level
    parts outside cab's (q, k, v) contract. The codebook is an (H, S, d) parameter initialised N(0, 1) from
    `seed` (LongVQ learns it; its code-book size per task is not published in the abstract, cab's default
    S = 64 is a benchmark choice; Transformer-VQ used 512). Non-differentiable: the assignment argmin.
    LongVQ trains keys with a straight-through estimator and the codebook with a commitment loss; neither
    is part of a forward operator, so here keys receive no gradient (conformance notes it) and the codebook
    receives its gradient through the query-codeword scores.
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, num_codes: int = 64, chunk_size: int = 64, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if num_codes < 1 or chunk_size < 1:
            raise ValueError("num_codes and chunk_size must be positive")
        self.num_codes, self.chunk_size, self.seed = num_codes, chunk_size, seed
        generator = torch.Generator().manual_seed(seed)
        codebook = torch.randn(num_heads, num_codes, head_dim, generator=generator, dtype=torch.float64)
        self.codebook = nn.Parameter(codebook.to(torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_codes={self.num_codes}, chunk_size={self.chunk_size}, seed={self.seed}"

    def assign(self, k: torch.Tensor) -> torch.Tensor:
        """(B, H, L) index of each key's nearest codeword (k has the query heads), without gradient."""
        with torch.no_grad():
            codes = self.codebook.to(k.dtype)
            distance = (codes * codes).sum(dim=-1)[None, :, None, :] - 2 * (k @ codes.transpose(-1, -2))
            return distance.argmin(dim=-1)

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        dtype = q.dtype
        codes = self.codebook.to(dtype)
        logits = (q @ codes.transpose(-1, -2)) * softmax_scale(q.shape[-1])  # (B, H, Lq, S)
        phi_q = torch.exp(logits - logits.detach().amax(dim=-1, keepdim=True))
        phi_k = F.one_hot(self.assign(k), self.num_codes).to(dtype)
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        out = pattern_linear_attention(self.pattern is Pattern.CS, phi_q, phi_k, v, self.chunk_size)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Softmax attention over the explicitly quantized keys C[z] (the full Lq x Lk score matrix)."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        index = self.assign(k)
        codes = self.codebook.to(q.dtype)
        quantized = torch.stack([codes[h][index[:, h]] for h in range(q.shape[1])], dim=1)  # (B, H, Lk, d)
        mask, empty = self.visible(q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        scores = (q @ quantized.transpose(-1, -2)) * softmax_scale(q.shape[-1])
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return zero_empty_rows(weights @ v, empty)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """Matmuls: query-codeword scores, key-codeword distances, and the linear attention over S
        features (global, or chunked for CS on the aligned, chunk-padded length)."""
        bh, s, d = batch * self.num_heads, self.num_codes, self.head_dim
        if self.pattern is Pattern.CS:
            length = max(lq, lk)
            c = self.chunk_size
            padded = -(-length // c) * c
            return 2 * bh * (2 * length * s * d + padded * (c * s + c * d + 2 * s * d + s))
        return 2 * bh * (lq * s * d + lk * s * d + lk * s * d + lq * s * d + lq * s)

    # decoding -----------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        if not self.causal:
            raise ValueError(f"incremental decoding applies to CS and CC, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        onehot = F.one_hot(self.assign(k), self.num_codes).to(dtype)
        if key_padding_mask is not None:
            onehot = onehot.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        return CodebookState(onehot.transpose(-1, -2) @ v, onehot.sum(dim=-2))

    def decode_step(self, state, q, k=None, v=None):
        dtype = compute_dtype(q.dtype)
        check_step_inputs(self, k, v)
        if self.cross:
            new = state
        else:
            k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
            onehot = F.one_hot(self.assign(k), self.num_codes).to(dtype)  # (B, H, 1, S)
            new = CodebookState(state.values + onehot.transpose(-1, -2) @ v, state.counts + onehot[:, :, 0])
        q = q.to(dtype)
        logits = (q @ self.codebook.to(dtype).transpose(-1, -2)) * softmax_scale(q.shape[-1])
        phi_q = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        den = phi_q @ new.counts.unsqueeze(-1)
        out = (phi_q @ new.values) / nonzero(den)
        return out.to(q.dtype), new
