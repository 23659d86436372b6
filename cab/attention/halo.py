"""HaloNets blocked local self-attention: each query block attends to its block grown by a halo, 1-D or 2-D,
on cab's block-sparse engine."""

from __future__ import annotations

import torch

from cab.attention.engine.blocksparse import BlockSparseAttention, Layout, layout_from_boxes
from cab.attention.engine.masks import aligned, floor_div, query_offset
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("blocks and halos are regions of one token grid shared by queries and keys; two different sequences "
          "have no common grid")


@register_attention(
    "halo", patterns=("NS", "CS"), family="local", exact=False, mechanism="M33",
    citation="Vaswani et al., Scaling Local Self-Attention for Parameter Efficient Visual Backbones, CVPR 2021",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class HaloAttention(BlockSparseAttention):
    """Blocked local self-attention with halo (HaloNets): the grid is cut into non-overlapping query blocks of
    `block` tokens per axis; every query of a block attends, by softmax over 1/sqrt(d) scores, to the keys
    of the block grown by `halo` tokens on each side of each axis ((b + 2h) x (b + 2h) in 2-D). Halo cells
    outside the grid do not exist (HaloNets pads them with zeros and masks them). Defaults: block 8, halo 3
    (HaloNet's b = 8, h = 3).

    Grid: `width` = 0 is a 1-D sequence; `width` = W > 0 lays tokens out row-major on rows of W columns (the
    last row may be short) with 2-D blocks b x b. Positions: query i sits at i (NS) and at i + Lk - Lq (CS,
    bottom-right as cab's causal mask). CS [EJ]: the paper is noncausal (vision); the causal variant keeps
    the haloed region intersected with key <= query on every axis (1-D: keys from the block start - h to the
    query). NC/CC are unsupported. Blocks start at position 0, so the pattern does not depend on where the
    sequence ends.

    Efficient path: cab's block-sparse engine; the engine's own tiles (64 tokens) list the key tiles that
    intersect the haloed regions of their queries. `backend="flex"`: the same as a FlexAttention BlockMask
    with the mask as mask_mod. reference(): the dense mask and an eager softmax. Padded keys are never seen;
    a row with no visible key outputs 0. Nothing is non-differentiable.
    """

    def __init__(self, pattern, num_heads, head_dim, block: int = 8, halo: int = 3, width: int = 0,
                 backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        if block < 1 or halo < 0 or width < 0:
            raise ValueError(f"block must be >= 1, halo and width >= 0, got {block}, {halo}, {width}")
        self.block, self.halo, self.width = block, halo, width
        self._set_backend(backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block={self.block}, halo={self.halo}, width={self.width}, "
                f"backend={self.backend}")

    def _coords(self, p, lk):
        if self.width == 0:
            return torch.zeros_like(p), p
        return floor_div(p, self.width), torch.remainder(p, self.width)

    def _range(self, t):
        """Haloed key coordinate range [lo, hi] of query coordinate(s) t on one axis."""
        start = floor_div(t, self.block) * self.block
        return start - self.halo, start + self.block - 1 + self.halo

    def mask_fn(self, lq, lk, extent=None):
        causal = self.causal

        def mask(b, h, p, j):
            r, c = self._coords(p, lk)
            rj, cj = self._coords(j, lk)
            c_lo, c_hi = self._range(c)
            vis = (cj >= c_lo) & (cj <= c_hi)
            if self.width:
                r_lo, r_hi = self._range(r)
                vis = vis & (rj >= r_lo) & (rj <= r_hi)
            if causal:
                vis = vis & (cj <= c) & (rj <= r)
            return vis

        return aligned(self.pattern, lq, lk, mask)

    def build_layout(self, lq, lk, block_q, block_k, extents) -> Layout:
        causal = self.pattern is Pattern.CS
        p = torch.arange(lq) + query_offset(self.pattern, lq, lk)
        r, c = self._coords(p, lk)
        c_lo, c_hi = self._range(c)
        r_lo, r_hi = self._range(r) if self.width else (r, r)
        if causal:
            c_hi, r_hi = torch.minimum(c_hi, c), torch.minimum(r_hi, r)
        return layout_from_boxes([(r_lo, r_hi, c_lo, c_hi)], self.width or max(lk, 1), block_q, block_k, lq, lk)
