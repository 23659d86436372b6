"""FLOP counts: dense-equivalent counts from visible (query, key) pairs, for any visibility mask (causal,
windows, padding), and the check of an attention's declared algorithmic formula against PyTorch's
`FlopCounterMode` on its forward pass.

The dense-equivalent count of a pattern is `cab.bench.flops.dense_flops` (FlashAttention's L^2/2 causal
convention as an option); `mask_flops` extends it to an arbitrary mask, e.g. a sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cab.attention.base import Attention
from cab.bench.flops import FLOP_MODES, dense_flops

__all__ = ["FlopCheck", "check_declared_flops", "counted_flops", "dense_flops", "mask_flops"]


def mask_flops(mask: torch.Tensor, heads: int, dk: int, dv: int, mode: str = "fwd") -> int:
    """Dense-equivalent matmul FLOPs of attention restricted to a bool mask (B or 1, 1 or H, Lq, Lk),
    True = visible, counting every visible pair exactly (the same per-pair cost as `dense_flops`)."""
    if mode not in FLOP_MODES:
        raise ValueError(f"mode must be one of {', '.join(FLOP_MODES)}, got {mode!r}")
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor of 4 dimensions (B, H, Lq, Lk)")
    per_head = 1 if mask.shape[1] == heads else heads
    pairs = int(mask.sum()) * per_head
    forward, backward = 2 * pairs * (dk + dv), 2 * pairs * (3 * dk + 2 * dv)
    return {"fwd": forward, "fwd_infer": forward, "bwd": backward, "fwdbwd": forward + backward}[mode]


def counted_flops(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_padding_mask: "torch.Tensor | None" = None) -> int:
    """The matmul FLOPs FlopCounterMode sees in one forward call (no autograd). scaled_dot_product_attention
    runs with its math backend, whose matmuls the counter sees (it counts no fused CPU kernel)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        attn(q, k, v) if key_padding_mask is None else attn(q, k, v, key_padding_mask=key_padding_mask)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class FlopCheck:
    """A declared formula against the counter on one shape (declared is None when undeclared)."""

    shape: str
    declared: "int | None"
    counted: int

    @property
    def agrees(self) -> bool:
        return self.declared == self.counted


def check_declared_flops(attn: Attention, batch: int, lq: int, lk: int, kv_heads: int, *,
                         padded: bool = False, seed: int = 0) -> FlopCheck:
    """Count the forward of `attn` on seeded inputs of the given sizes (with a key padding mask on the last
    batch row when `padded`) and set it beside the declared `algorithmic_flops`."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next((p.dtype for p in attn.parameters()), torch.float32)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    q = draw(batch, attn.num_heads, lq, attn.head_dim)
    k, v = draw(batch, kv_heads, lk, attn.head_dim), draw(batch, kv_heads, lk, attn.head_dim)
    mask = None
    if padded:
        mask = torch.zeros(batch, lk, dtype=torch.bool)
        mask[-1, lk - max(1, lk // 4):] = True
    shape = f"B={batch} Hq={attn.num_heads} Hkv={kv_heads} Lq={lq} Lk={lk} D={attn.head_dim}" + \
        (" padded" if padded else "")
    return FlopCheck(shape, attn.algorithmic_flops(batch, lq, lk, kv_heads), counted_flops(attn, q, k, v, mask))
