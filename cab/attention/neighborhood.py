"""Neighborhood Attention (NA, 1-D and 2-D, with dilation) and Generalized Neighborhood Attention (GNA: NA
with a stride, covering sliding, strided-sliding and blocked windows), on cab's block-sparse engine."""

from __future__ import annotations

import torch

from cab.attention.engine.blocksparse import BlockSparseAttention, Layout, layout_from_boxes
from cab.attention.engine.masks import aligned, query_offset
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("a neighbourhood is defined on one token grid shared by queries and keys; two different sequences "
          "have no common grid, so any alignment would be an arbitrary choice rather than neighborhood attention")


def _axis_window(t: torch.Tensor, n: int, kernel: int, dilation: int, stride: int, causal: bool):
    """Per-axis window of query coordinate(s) t on an axis of n positions: (group, start, end) in dilated
    coordinates (key coordinate u is in the window iff u % dilation == group and start <= u // dilation <=
    end; causal additionally needs u <= t)."""
    group = torch.remainder(t, dilation)
    tt = torch.div(t, dilation, rounding_mode="floor")
    size = torch.div(n - group + dilation - 1, dilation, rounding_mode="floor")  # positions of this group
    base = torch.div(tt, stride, rounding_mode="floor") * stride
    if causal:
        end = base + stride - 1  # the stride group's last query leads (not clamped to the end: the window
        # of a query must not depend on how many tokens follow it)
        start = (end - kernel + 1).clamp(min=0)
    else:
        leader = torch.minimum(base + stride // 2, size - 1)  # the stride group's centre leads
        start = torch.minimum((leader - kernel // 2).clamp(min=0), (size - kernel).clamp(min=0))
        end = start + kernel - 1
    return group, start, end


def _axis_visible(t, u, n, kernel, dilation, stride, causal):
    group, start, end = _axis_window(t, n, kernel, dilation, stride, causal)
    uu = torch.div(u, dilation, rounding_mode="floor")
    vis = (torch.remainder(u, dilation) == group) & (uu >= start) & (uu <= end)
    return vis & (u <= t) if causal else vis


class _Neighborhood(BlockSparseAttention):
    """Shared implementation of `neighborhood` and `gna` (see their docstrings)."""

    extent_dependent = True  # noncausal windows shift at the sequence end

    def _setup(self, kernel_size, dilation, stride, width, backend):
        if kernel_size < 1 or dilation < 1 or stride < 1 or width < 0:
            raise ValueError(f"kernel_size, dilation and stride must be >= 1 and width >= 0, got "
                             f"{kernel_size}, {dilation}, {stride}, {width}")
        if stride > kernel_size:
            raise ValueError(f"stride ({stride}) must not exceed kernel_size ({kernel_size}): queries of a stride "
                             f"group would get no shared neighbourhood")
        self.kernel_size, self.dilation, self.stride, self.width = kernel_size, dilation, stride, width
        self._set_backend(backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"stride={self.stride}, width={self.width}, backend={self.backend}")

    def _grid(self, n):
        """(rows, cols) of a grid of n tokens (n an int or a tensor): one row of n in 1-D."""
        if self.width == 0:
            return 1, n
        return (n + self.width - 1) // self.width, self.width

    def mask_fn(self, lq, lk, extent=None):
        kw = dict(kernel=self.kernel_size, dilation=self.dilation, stride=self.stride, causal=self.causal)
        ext = torch.tensor([lk]) if extent is None else extent

        def mask(b, h, p, j):
            n = ext.to(p.device)[b] if extent is not None else lk
            if self.width == 0:
                return _axis_visible(p, j, n, **kw)
            rows, cols = self._grid(n)
            r, c = torch.div(p, cols, rounding_mode="floor"), torch.remainder(p, cols)
            rj, cj = torch.div(j, cols, rounding_mode="floor"), torch.remainder(j, cols)
            return _axis_visible(r, rj, rows, **kw) & _axis_visible(c, cj, cols, **kw)

        return aligned(self.pattern, lq, lk, mask)

    def build_layout(self, lq, lk, block_q, block_k, extents) -> Layout:
        causal = self.pattern is Pattern.CS
        p = torch.arange(lq) + query_offset(self.pattern, lq, lk)
        kw = dict(kernel=self.kernel_size, dilation=self.dilation, stride=self.stride, causal=causal)

        def interval(t, n):
            group, start, end = _axis_window(t, n, **kw)
            lo, hi = group + self.dilation * start, group + self.dilation * end
            return lo, (torch.minimum(hi, t) if causal else hi)

        boxes = []
        for n in extents:  # the union over the batch's extents
            if self.width == 0:
                lo, hi = interval(p, n)
                zero = torch.zeros_like(p)
                boxes.append((zero, zero, lo, hi))
            else:
                rows, cols = self._grid(n)
                r, c = torch.div(p, cols, rounding_mode="floor"), torch.remainder(p, cols)
                boxes.append(interval(r, rows) + interval(c, cols))
        width = self.width or max(lk, 1)
        return layout_from_boxes(boxes, width, block_q, block_k, lq, lk)


_DOC_COMMON = """
    Grid: `width` = 0 is a 1-D sequence; `width` = W > 0 lays the Lk keys out row-major on ceil(Lk/W) rows of
    W columns (token t at row t // W, column t % W; the last row may be short, its missing cells are simply
    absent) and the neighbourhood is the product of the per-axis ones. The grid ends at each batch
    element's extent (its last real key + 1), so trailing padded keys never shift a border window; padded
    keys inside the extent are grid cells that are never seen. Positions: query i sits at i (NS) and
    at i + Lk - Lq (CS, bottom-right as cab's causal mask); NC/CC are unsupported.

    Per axis of n positions, with kernel k, dilation d and stride s: positions split into d interleaved
    groups (t % d); within a group (index u = t // d, n_g positions) a query's window is the k group
    positions from start = clamp(leader - k//2, 0, n_g - k) (noncausal; the window shifts at the borders so
    every query keeps k neighbours, as NA defines it; all n_g when n_g < k), where the leader is the centre
    of the query's stride group [s*floor(u/s), s*floor(u/s) + s) (s = 1: the query itself). CS (NATTEN's
    per-axis causal NA): the window is the k group positions ending at the stride group's last query (also
    when that query lies past the end, so a row never depends on the sequence length), intersected with
    key <= query on every axis, so no key after the query is ever visible.

    Efficient path: cab's block-sparse engine (`engine.blocksparse`): per query block, only the key blocks that
    intersect its neighbourhoods' bounding boxes are gathered and scored, masked to the exact neighbourhood
    (dilation gaps inside a box are scored and masked: a gathered-block implementation without NATTEN's
    token permutation pays them). `backend="flex"` runs the same block list and mask as a FlexAttention
    BlockMask/mask_mod. reference(): the dense (Lq, Lk) neighbourhood mask and an eager softmax. Padded keys
    are never seen; a row with no visible key outputs 0. Nothing is non-differentiable.
"""


@register_attention(
    "neighborhood", patterns=("NS", "CS"), family="local", exact=False, mechanism="M31",
    citation="Hassani et al., Neighborhood Attention Transformer, CVPR 2023; Hassani et al., Faster Neighborhood "
    "Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level, NeurIPS 2024",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class NeighborhoodAttention(_Neighborhood):
    __doc__ = """Neighborhood Attention: each query attends to its `kernel_size` nearest neighbours per axis
    (dilated by `dilation`), 1-D or 2-D; softmax over the neighbourhood with 1/sqrt(d) scores. Defaults:
    kernel 7, dilation 1 (NAT's 7x7 neighbourhoods).
""" + _DOC_COMMON

    def __init__(self, pattern, num_heads, head_dim, kernel_size: int = 7, dilation: int = 1, width: int = 0,
                 backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        self._setup(kernel_size, dilation, 1, width, backend)


@register_attention(
    "gna", patterns=("NS", "CS"), family="local", exact=False, mechanism="M32",
    citation="Hassani et al., Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed "
    "of Light, arXiv 2504.16922 (2025)",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class GeneralizedNeighborhoodAttention(_Neighborhood):
    __doc__ = """Generalized Neighborhood Attention: NA with a `stride` s: queries are tiled in groups of s
    per axis and every query of a group takes the neighbourhood of the group's leader. s = 1 is NA (sliding
    window), 1 < s < k strided sliding window, s = k blocked attention (each tile attends to its own tile
    when the window is aligned). Defaults [EJ]: kernel 16, stride 8 (a strided window whose tiles share
    half of their neighbourhood), dilation 1; the paper's experiments set these per model.
""" + _DOC_COMMON

    def __init__(self, pattern, num_heads, head_dim, kernel_size: int = 16, stride: int = 8, dilation: int = 1,
                 width: int = 0, backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        self._setup(kernel_size, dilation, stride, width, backend)
