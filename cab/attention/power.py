"""PowerAttention: a static block pattern whose key blocks sit at power-of-two block distances from the query
block (plus the local and sink blocks), on cab's block-sparse engine."""

from __future__ import annotations

import torch

from cab.attention.engine.blocksparse import BlockSparseAttention, Layout, layout_from_boxes
from cab.attention.engine.masks import aligned, floor_div, query_offset
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("block distances are measured on one position axis shared by queries and keys; two different "
          "sequences have no common positions")


def _is_power_of_two(d: torch.Tensor) -> torch.Tensor:
    return (d > 0) & ((d & (d - 1)) == 0)


@register_attention(
    "power", patterns=("NS", "CS"), family="sparse", exact=False, mechanism="M35",
    citation="Chen et al., PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse "
    "Attention, arXiv 2503.03588 (2025)",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class PowerAttention(BlockSparseAttention):
    """PowerAttention [BG]: positions are cut into blocks of `block` tokens; query block m attends to key
    block n when the block distance d = m - n is 0 or a power of two (1, 2, 4, 8, ...), or d <= `window`
    (local blocks), or n < `sinks` (sink blocks), with token-level causality (key <= query) inside; softmax
    over the union with 1/sqrt(d) scores. With d layers, information reaches 2^d blocks back along a
    complete, continuous path (the paper's receptive-field argument); a query block lists O(log(L / block))
    key blocks, so cost is O(L log L) like a slightly wider sliding window. Defaults: block 64, window 1,
    sinks 1 [EJ: the paper combines the power-of-two blocks with sink and local blocks as in StreamingLLM;
    its block size follows its kernel's tile].

    Positions: query i sits at i + Lk - Lq in CS (bottom-right as cab's causal mask), at i in NS. NS [EJ]:
    the paper is autoregressive; the noncausal variant is symmetric (|d| a power of two, within the window,
    or a sink block) without the causal cut. NC/CC are unsupported. The pattern depends only on positions,
    never on the sequence length.

    Efficient path: cab's block-sparse engine (gathered key blocks per 64-row query tile: the pattern's
    blocks are in position space, so a tile lists the union of its rows' blocks); `backend="flex"`: the same
    in FlexAttention. reference(): the dense mask and an eager softmax. Padded keys are never seen.
    """

    def __init__(self, pattern, num_heads, head_dim, block: int = 64, window: int = 1, sinks: int = 1,
                 backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        if block < 1 or window < 0 or sinks < 0:
            raise ValueError(f"block must be >= 1, window and sinks >= 0, got {block}, {window}, {sinks}")
        self.block, self.window, self.sinks = block, window, sinks
        self._set_backend(backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block={self.block}, window={self.window}, sinks={self.sinks}, "
                f"backend={self.backend}")

    def mask_fn(self, lq, lk, extent=None):
        def blocks(b, h, p, j):
            kb = floor_div(j, self.block)
            dist = (floor_div(p, self.block) - kb).abs()  # causal rows only see dist = d >= 0
            return (dist <= self.window) | _is_power_of_two(dist) | (kb < self.sinks)

        return aligned(self.pattern, lq, lk, blocks)

    def build_layout(self, lq, lk, block_q, block_k, extents) -> Layout:
        causal = self.pattern is Pattern.CS
        p = torch.arange(lq) + query_offset(self.pattern, lq, lk)
        m = floor_div(p, self.block)
        zero = torch.zeros_like(p)
        num_blocks = -(-max(lk, 1) // self.block) + max(0, int(m.max()) if lq else 0) + 1
        distances = sorted({*range(self.window + 1), *(1 << e for e in range(max(1, num_blocks).bit_length() + 1))})
        boxes = []
        for d in distances:
            for sign in ((1,) if causal or d == 0 else (1, -1)):
                n = m - sign * d
                hi = n * self.block + self.block - 1
                boxes.append((zero, zero, n * self.block, torch.minimum(hi, p) if causal else hi))
        return layout_from_boxes(boxes, max(lk, 1), block_q, block_k, lq, lk, extra_keys=self.sinks * self.block)
