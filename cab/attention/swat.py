"""SWAT: sliding-window attention with sigmoid instead of softmax, balanced ALiBi and rotary position
embeddings, on cab's block-sparse engine."""

from __future__ import annotations

import torch

from cab.attention.engine.blocksparse import BlockSparseAttention, Layout, layout_from_boxes
from cab.attention.engine.masks import aligned, query_offset, sliding_window
from cab.attention.engine.rotary import rotate_half
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("the window, ALiBi distances and rotary angles are measured on one position axis shared by queries "
          "and keys; two different sequences have no common positions")


def balanced_alibi_slopes(num_heads: int) -> torch.Tensor:
    """(H,) float64 slopes: the first ceil(H/2) heads ALiBi's geometric slopes 2^(-8 k / n) (k = 1..n) as
    decays (negative: far keys penalised), the other heads the same magnitudes as positive slopes (far keys
    favoured), so half of the heads look back further."""
    n_neg = (num_heads + 1) // 2
    n_pos = num_heads - n_neg

    def geometric(n):
        return torch.tensor([2.0 ** (-8.0 * (k + 1) / n) for k in range(n)], dtype=torch.float64)

    parts = [-geometric(n_neg)] + ([geometric(n_pos)] if n_pos else [])
    return torch.cat(parts)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE (rotate-half convention) of x (..., L, D) at integer positions (L,): channel pairs (c, c + D'/2)
    of the first D' = 2 floor(D/2) channels rotated by positions * base^(-2c/D'); an odd last channel is kept."""
    dim = x.shape[-1] - x.shape[-1] % 2
    if dim == 0:
        return x
    half = dim // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / dim)
    angle = positions.to(torch.float64)[:, None] * freq[None]
    return rotate_half(x, angle.cos().to(x.dtype), angle.sin().to(x.dtype))


@register_attention(
    "swat", patterns=("NS", "CS"), family="local", exact=False, mechanism="M30",
    citation="Fu et al., Sliding Window Attention Training for Efficient Large Language Models, "
    "arXiv 2502.18845 (2025)",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class SWATAttention(BlockSparseAttention):
    """SWAT [A/BG]: out_i = sum_{j in window(i)} sigmoid(<R_i q_i, R_j k_j> / sqrt(d) + s_h (i - j)) v_j.
    Sigmoid replaces softmax (no row normalisation: each key's weight is independent, so a query need not
    spread a fixed mass over its window); R_p is the rotary embedding at position p (RoPE, base 10000);
    s_h are balanced ALiBi slopes (half of the heads decay with distance, half grow with it, with ALiBi's
    geometric magnitudes 2^(-8k/n)). Window [EJ: the seed gives no size]: CS keys i - w..i (w + 1 keys);
    NS |i - j| <= w with the bias on |i - j|. Default w = 127 (a 128-token causal window).

    Positions: query i sits at i (NS) and at i + Lk - Lq (CS, bottom-right as cab's causal mask); the rotary
    angles and the ALiBi distances use those positions. NC/CC are unsupported. Padded keys get weight 0; a row
    with no visible key outputs 0 (sigmoid weights of an empty set).

    Efficient path: cab's block-sparse engine with sigmoid normalisation and the bias as a score_mod (query
    tiles gather the key tiles of their windows); q and k are rotated once, outside. No FlexAttention path:
    FlexAttention always normalises by softmax. reference(): rotated q, k, the dense window mask, the dense
    bias and an eager sigmoid. Nothing is non-differentiable.
    """

    normalize = "sigmoid"

    def __init__(self, pattern, num_heads, head_dim, window: int = 127, rope_base: float = 10000.0):
        super().__init__(pattern, num_heads, head_dim)
        if window < 0 or rope_base <= 0:
            raise ValueError(f"window must be >= 0 and rope_base > 0, got {window}, {rope_base}")
        self.window, self.rope_base = window, rope_base
        self.register_buffer("slopes", balanced_alibi_slopes(num_heads), persistent=False)
        self._set_backend("torch")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, rope_base={self.rope_base}"

    def _offset(self, lq, lk):
        return query_offset(self.pattern, lq, lk)

    def mask_fn(self, lq, lk, extent=None):
        return aligned(self.pattern, lq, lk, sliding_window(self.window))

    def score_mod(self, lq, lk):
        offset = self._offset(lq, lk)

        def bias(scores, h, i, j):
            slope = self.slopes.to(device=scores.device, dtype=scores.dtype)[h]
            return scores + slope * (i + offset - j).abs().to(scores.dtype)

        return bias

    def build_layout(self, lq, lk, block_q, block_k, extents) -> Layout:
        p = torch.arange(lq) + self._offset(lq, lk)
        zero = torch.zeros_like(p)
        hi = p if self.pattern is Pattern.CS else p + self.window
        return layout_from_boxes([(zero, zero, p - self.window, hi)], max(lk, 1), block_q, block_k, lq, lk)

    def _rotate(self, q, k):
        lq, lk = q.shape[-2], k.shape[-2]
        q_pos = torch.arange(lq, device=q.device) + self._offset(lq, lk)
        return rotary(q, q_pos, self.rope_base), rotary(k, torch.arange(lk, device=k.device), self.rope_base)

    def forward(self, q, k, v, key_padding_mask=None):
        q, k = self._rotate(q, k)
        return super().forward(q, k, v, key_padding_mask)

    def reference(self, q, k, v, key_padding_mask=None):
        q, k = self._rotate(q, k)
        return super().reference(q, k, v, key_padding_mask)
