"""Shifted sparse attention: LongLoRA's S2-Attn (attention within token groups, half of the heads shifted by
half a group) and SinkLoRA's SF-Attn (the shifted groups put back in place, plus global sink tokens), on
cab's block-sparse engine."""

from __future__ import annotations

import torch

from cab.attention.engine.blocksparse import BlockSparseAttention, Layout, layout_from_boxes
from cab.attention.engine.masks import aligned, floor_div, query_offset
from cab.patterns import Pattern
from cab.registry import register_attention

_CROSS = ("token groups are segments of one position axis shared by queries and keys; two different sequences "
          "have no common positions")


class _Shifted(BlockSparseAttention):
    """Shared implementation of s2_attn and sf_attn (see their docstrings)."""

    heads_vary = True
    wrap = False  # S2-Attn NS: the shifted heads' groups wrap around the sequence end

    def _setup(self, group_size, sinks, backend):
        if group_size < 2 or sinks < 0:
            raise ValueError(f"group_size must be >= 2 and sinks >= 0, got {group_size}, {sinks}")
        self.group_size, self.sinks = group_size, sinks
        self.extent_dependent = self.wrap and self.pattern is Pattern.NS
        self._set_backend(backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group_size={self.group_size}, sinks={self.sinks}, "
                f"backend={self.backend}")

    def _shifted(self, h):
        return h >= self.num_heads // 2 if self.num_heads > 1 else torch.zeros_like(h, dtype=torch.bool)

    def mask_fn(self, lq, lk, extent=None):
        g, half = self.group_size, self.group_size // 2
        wrap = self.extent_dependent

        def group(x, shifted, n):
            if wrap:  # LongLoRA: roll the shifted heads by -G/2, so index (x - G/2) mod n
                return torch.where(shifted, floor_div(torch.remainder(x - half, n), g), floor_div(x, g))
            return torch.where(shifted, floor_div(x + half, g), floor_div(x, g))

        def mask(b, h, p, j):
            shifted = self._shifted(h)
            n = extent.clamp(min=1).to(p.device)[b] if wrap else lk
            if wrap:  # keys past the element's extent keep their own (unrolled) group
                same = torch.where(j < n, group(p, shifted, n) == group(j, shifted, n), False)
            else:
                same = group(p, shifted, n) == group(j, shifted, n)
            return same | (j < self.sinks)

        return aligned(self.pattern, lq, lk, mask)

    def build_layout(self, lq, lk, block_q, block_k, extents) -> Layout:
        causal = self.pattern is Pattern.CS
        p = torch.arange(lq) + query_offset(self.pattern, lq, lk)
        g, half = self.group_size, self.group_size // 2
        zero = torch.zeros_like(p)
        plain_lo = floor_div(p, g) * g
        shift_lo = floor_div(p + half, g) * g - half
        shifted = self._shifted(torch.arange(self.num_heads))[:, None]
        boxes = []
        if self.extent_dependent:
            for n in extents:
                n = max(n, 1)
                idx = torch.remainder(p - half, n)  # the query's index after the roll
                roll = half % n  # index x holds position (x + roll) mod n
                lo = floor_div(idx, g) * g + roll  # the group's first position, unrolled
                hi = torch.minimum(floor_div(idx, g) * g + g - 1, torch.tensor(n - 1)) + roll
                for lo_, hi_ in ((lo, torch.minimum(hi, torch.tensor(n - 1))), (lo - n, hi - n)):
                    boxes.append((zero, zero, torch.where(shifted, lo_, plain_lo),
                                  torch.where(shifted, hi_, plain_lo + g - 1)))
        else:
            lo = torch.where(shifted, shift_lo, plain_lo)
            hi = lo + g - 1
            boxes.append((zero, zero, lo, torch.minimum(hi, p) if causal else hi))
        return layout_from_boxes(boxes, max(lk, 1), block_q, block_k, lq, lk, extra_keys=self.sinks)


_DOC_COMMON = """
    Groups: unshifted heads (the first H // 2) group positions [mG, (m+1)G); shifted heads (the rest) group
    [mG - G/2, (m+1)G - G/2) (so the first group has G/2 tokens). A query attends, by softmax over 1/sqrt(d)
    scores, to the keys of its own group (CS: at or before it), plus the first `sinks` keys. Positions: query
    i sits at i (NS) and at i + Lk - Lq (CS, bottom-right as cab's causal mask). NC/CC are unsupported.
    Efficient path: cab's block-sparse engine with per-head block lists (a query tile lists the key tiles
    of its rows' groups); `backend="flex"`: the same in FlexAttention. reference(): the dense per-head mask
    and an eager softmax. Padded keys are never seen; a row with no visible key outputs 0.
"""


@register_attention(
    "s2_attn", patterns=("NS", "CS"), family="sparse", exact=False, mechanism="M46",
    citation="Chen et al., LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models, ICLR 2024",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class ShiftedSparseAttention(_Shifted):
    __doc__ = """S2-Attn (LongLoRA): attention within groups of `group_size` tokens, with half of the heads shifted
    by half a group so that information flows between neighbouring groups. Default: group 2048 (LongLoRA's
    1/4 of its 8192-token fine-tuning context; a fixed size, so a row never depends on the length).

    NS: as LongLoRA's code, the shifted heads roll the sequence by -G/2, so their last group wraps around
    the end and joins the last G/2 tokens with the first G/2 (over each element's extent, its last real key
    + 1, so trailing padding cannot move it). CS: that wrap-around group, with LongLoRA's within-group causal
    mask applied after the roll, lets the first tokens see the last ones — a leak of the future that cab's
    causality checks reject — so under CS the shifted heads' groups do not wrap (the first G/2 tokens form
    their own group) [EJ]; SinkLoRA's SF-Attn makes the same repair on purpose.
""" + _DOC_COMMON

    wrap = True

    def __init__(self, pattern, num_heads, head_dim, group_size: int = 2048, sinks: int = 0,
                 backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        self._setup(group_size, sinks, backend)


@register_attention(
    "sf_attn", patterns=("NS", "CS"), family="sparse", exact=False, mechanism="M46",
    citation="Zhang, SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models, "
    "arXiv 2406.05678 (2024)",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class SinkFocusedAttention(_Shifted):
    __doc__ = """SF-Attn (SinkLoRA): S2-Attn whose cyclically shifted groups are returned to their un-shifted
    place (the segmentation and reassembly step: the wrap-around group of the shifted heads is split back
    into the sequence's first and last G/2 tokens, so no group joins the end with the start), plus global
    attention to `sinks` sink tokens (the first keys, visible to every query; CS: to queries at or after
    them). Defaults: group 2048 (as s2_attn), 4 sinks (StreamingLLM's four). SinkLoRA's H2O KV-cache
    compression belongs to inference-time caching, not to this operator, and is not modelled.
""" + _DOC_COMMON

    def __init__(self, pattern, num_heads, head_dim, group_size: int = 2048, sinks: int = 4,
                 backend: str = "torch"):
        super().__init__(pattern, num_heads, head_dim)
        self._setup(group_size, sinks, backend)
