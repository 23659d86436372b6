"""Seeded benchmark inputs for a cell: q, k, v and the output gradient, on the cell's device and dtype."""

from __future__ import annotations

import torch

from cab.cells import DTYPES, Cell


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a cell's dtype name ("float32", "bfloat16", ...)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def make_inputs(cell: Cell, requires_grad: bool) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]":
    """(q, k, v, dout) drawn from N(0, 1) with a generator seeded by cell.seed, created on the device.

    q (B, heads, lq, head_dim), k and v (B, kv_heads, lk, head_dim), dout like the output
    (B, heads, lq, head_dim). q, k and v are leaves with requires_grad as asked; dout never requires grad.
    """
    device, dtype = torch.device(cell.device), torch_dtype(cell.dtype)
    generator = torch.Generator(device=device).manual_seed(cell.seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    q = draw(cell.batch, cell.heads, cell.lq, cell.head_dim)
    k = draw(cell.batch, cell.kv_heads, cell.lk, cell.head_dim)
    v = draw(cell.batch, cell.kv_heads, cell.lk, cell.head_dim)
    dout = draw(cell.batch, cell.heads, cell.lq, cell.head_dim)
    for tensor in (q, k, v):
        tensor.requires_grad_(requires_grad)
    return q, k, v, dout
