"""CLEAR: conv-like local attention, softmax over a circular 2-D window around each query token, on cab's
block-sparse engine."""

from __future__ import annotations

import torch

from cab.attention.engine.blocksparse import BlockSparseAttention, Layout, layout_from_boxes
from cab.attention.engine.masks import aligned, floor_div, query_offset
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("the circular window is a neighbourhood on one token grid shared by queries and keys; two different "
          "sequences have no common grid")


@register_attention(
    "clear", patterns=("NS", "CS"), family="local", exact=False, mechanism="M34",
    citation="Liu et al., CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up, "
    "arXiv 2412.16112 (2024)",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class ClearAttention(BlockSparseAttention):
    """CLEAR's local attention: tokens on a row-major 2-D grid of `width` columns; query (r, c) attends, by
    softmax over 1/sqrt(d) scores, to the keys (r', c') with (r - r')^2 + (c - c')^2 <= radius^2 (a circle,
    like a convolution's receptive field, not shifted at the borders: border queries see fewer keys, as in
    the paper's formulation). Defaults [EJ]: radius 8 (the paper sweeps r = 8, 16, 32) and width 64 (the
    64 x 64 latent token grid of a 1024-pixel FLUX image); width 0 is a 1-D sequence (|i - j| <= radius).

    CLEAR linearises a pre-trained DiT by distillation (its fine-tuning recipe is out of scope; the attention
    operator is what cab benchmarks). Positions: query i sits at i (NS) and at i + Lk - Lq (CS, bottom-right).
    CS [EJ]: the paper is noncausal (image generation); the causal variant keeps the circle intersected with
    raster order (key index <= query position). NC/CC are unsupported. The window does not depend on where
    the sequence ends.

    Efficient path: cab's block-sparse engine over the circle's bounding square (the corners are scored and
    masked); `backend="flex"`: the same block list and mask in FlexAttention. reference(): the dense mask and
    an eager softmax. Padded keys are never seen; a row with no visible key outputs 0.
    """

    def __init__(self, pattern, num_heads, head_dim, radius: int = 8, width: int = 64, backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        if radius < 0 or width < 0:
            raise ValueError(f"radius and width must be >= 0, got {radius}, {width}")
        self.radius, self.width = radius, width
        self._set_backend(backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, radius={self.radius}, width={self.width}, backend={self.backend}"

    def _coords(self, p):
        if self.width == 0:
            return torch.zeros_like(p), p
        return floor_div(p, self.width), torch.remainder(p, self.width)

    def mask_fn(self, lq, lk, extent=None):
        def circle(b, h, p, j):
            r, c = self._coords(p)
            rj, cj = self._coords(j)
            return (r - rj) ** 2 + (c - cj) ** 2 <= self.radius ** 2

        return aligned(self.pattern, lq, lk, circle)

    def build_layout(self, lq, lk, block_q, block_k, extents) -> Layout:
        causal = self.pattern is Pattern.CS
        p = torch.arange(lq) + query_offset(self.pattern, lq, lk)
        r, c = self._coords(p)
        rad = self.radius
        r_lo, r_hi = (r - rad, (r if causal else r + rad)) if self.width else (r, r)
        c_lo, c_hi = c - rad, (c if causal and not self.width else c + rad)
        return layout_from_boxes([(r_lo, r_hi, c_lo, c_hi)], self.width or max(lk, 1), block_q, block_k, lq, lk)
