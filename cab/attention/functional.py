"""Small tensor helpers shared by the attention modules."""

from __future__ import annotations

import torch


def softmax_scale(head_dim: int) -> float:
    """The usual 1/sqrt(d) score scale."""
    return head_dim ** -0.5


def zero_empty_rows(out: torch.Tensor, empty_rows: "torch.Tensor | None") -> torch.Tensor:
    """Zero the output rows whose query sees no key (empty_rows is bool (B, 1, Lq, 1) or None)."""
    if empty_rows is None:
        return out
    return out.masked_fill(empty_rows, 0.0)
