"""Composable element masks in FlexAttention's mask_mod form, `mask_fn(b, h, i, j) -> bool tensor` on broadcast
index tensors (the attention-gym style): one definition serves the dense reference, the block-sparse gather and
FlexAttention. A mechanism writes its pattern over key positions and `aligned` adds the causal pattern's
bottom-right offset and clause, so `lk - lq` and `j <= i + offset` are written once, here."""

from __future__ import annotations

from typing import Callable

import torch

from cab.patterns import Pattern

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def and_masks(*masks: MaskFn) -> MaskFn:
    """Visible where every mask is."""

    def mask(b, h, i, j):
        vis = masks[0](b, h, i, j)
        for other in masks[1:]:
            vis = vis & other(b, h, i, j)
        return vis

    return mask


def or_masks(*masks: MaskFn) -> MaskFn:
    """Visible where any mask is."""

    def mask(b, h, i, j):
        vis = masks[0](b, h, i, j)
        for other in masks[1:]:
            vis = vis | other(b, h, i, j)
        return vis

    return mask


def floor_div(a, b):
    """a // b rounding toward -inf, for the integer position tensors (or ints) of mask functions."""
    return torch.div(a, b, rounding_mode="floor")


def query_offset(pattern: Pattern, lq: int, lk: int) -> int:
    """Key position minus row index of a query: Lk - Lq under CS (bottom-right alignment), else 0."""
    return lk - lq if pattern is Pattern.CS else 0


def diagonal_mask(offset: "int | torch.Tensor") -> MaskFn:
    """Keys up to a diagonal: row i sees keys j <= i + offset. torch.compile bakes an int offset into the
    kernel it compiles and takes a tensor offset as a kernel input, so one kernel serves every offset."""

    def mask(b, h, i, j):
        return j <= i + offset

    return mask


def causal_mask(lq: int, lk: int) -> MaskFn:
    """Causal self attention aligned bottom-right: row i sees keys j <= i + Lk - Lq."""
    return diagonal_mask(lk - lq)


def at_positions(mask_fn: MaskFn, offset: int) -> MaskFn:
    """mask_fn written over key positions, evaluated at query rows: row i sits at key position i + offset."""
    if offset == 0:
        return mask_fn

    def mask(b, h, i, j):
        return mask_fn(b, h, i + offset, j)

    return mask


def aligned(pattern: Pattern, lq: int, lk: int, mask_fn: MaskFn) -> MaskFn:
    """A mechanism's mask over key positions, mask_fn(b, h, p, j), as a mask over query rows for `pattern`: under
    CS the query of row i sits at p = i + Lk - Lq and sees no later key; the other patterns take it as it is."""
    shifted = at_positions(mask_fn, query_offset(pattern, lq, lk))
    return and_masks(causal_mask(lq, lk), shifted) if pattern is Pattern.CS else shifted


def sliding_window(window: int) -> MaskFn:
    """Keys at most `window` positions away from the query position (on both sides; `aligned` cuts the future)."""

    def mask(b, h, p, j):
        return (p - j).abs() <= window

    return mask


def key_prefix(count: int) -> MaskFn:
    """The first `count` keys (attention sinks, global tokens), visible to every query."""

    def mask(b, h, p, j):
        return j < count

    return mask


def padding_mask(key_padding_mask: torch.Tensor) -> MaskFn:
    """Real keys only: key_padding_mask (B, Lk) bool, True = padding."""

    def mask(b, h, i, j):
        return ~key_padding_mask[b, j]

    return mask


def same_segment(segment_runs: torch.Tensor) -> MaskFn:
    """Documents packed in one sequence (self patterns): keys of the query's own segment, segment_runs (B, L)
    numbering the maximal runs of equal ids (`cab.patterns.segment_runs`)."""

    def mask(b, h, i, j):
        return segment_runs[b, i] == segment_runs[b, j]

    return mask
