"""Rotations of channel pairs (rotary position embeddings and their relatives)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs (x_m, x_{m + h}) of x (..., L, D) by the angles whose cosines and sines are cos,
    sin (..., L, h), h = cos.shape[-1] <= D / 2 (RoPE's rotate-half convention); channels from 2h on are kept."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs (x_m, x_{m + D/2}) of x (..., L, D) by angles (..., L, D // 2); an odd last
    channel is left as it is."""
    return rotate_half(x, torch.cos(angles), torch.sin(angles))
