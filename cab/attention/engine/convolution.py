"""Convolutions along the sequence: depthwise 1-D convolutions (the local terms of InLine and Agent
Attention, with a loop reference) and the Toeplitz product by FFT (kernelized attention with relative
positions)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, causal: bool) -> torch.Tensor:
    """Per-channel 1-D convolution along the sequence: x (B, H, L, D), weight (H, D, K) with K odd when
    not causal. Noncausal: out_i = sum_o weight[..., o] x_{i + o - K//2} (centred); causal: out_i =
    sum_o weight[..., o] x_{i - K + 1 + o} (the last tap is position i). Zero outside the sequence."""
    batch, heads, length, dim = x.shape
    taps = weight.shape[-1]
    left = taps - 1 if causal else taps // 2
    right = 0 if causal else taps - 1 - taps // 2
    flat = x.permute(0, 1, 3, 2).reshape(batch, heads * dim, length)
    flat = F.pad(flat, (left, right))
    out = F.conv1d(flat, weight.reshape(heads * dim, 1, taps).to(x.dtype), groups=heads * dim)
    return out.reshape(batch, heads, dim, length).permute(0, 1, 3, 2)


def depthwise_conv_reference(x: torch.Tensor, weight: torch.Tensor, causal: bool) -> torch.Tensor:
    """The same convolution as an explicit loop over the taps."""
    length, taps = x.shape[-2], weight.shape[-1]
    left = taps - 1 if causal else taps // 2
    out = torch.zeros_like(x)
    for o in range(taps):
        shift = o - left  # out_i += w[o] * x_{i + shift}
        w = weight[:, :, o].to(x.dtype)[None, :, None, :]  # (1, H, 1, D)
        lo, hi = max(0, -shift), min(length, length - shift)
        if lo < hi:
            out[:, :, lo:hi] = out[:, :, lo:hi] + w * x[:, :, lo + shift:hi + shift]
    return out


def toeplitz_products(x: torch.Tensor, kernel: torch.Tensor, lq: int) -> torch.Tensor:
    """y_i = sum_j kernel[i - j + (Lk - 1)] x_j for i < lq, by FFT: x (B, H, Lk, C), kernel (H, lq + Lk - 1)
    holding the weight of every offset i - j from -(Lk - 1) to lq - 1. O((Lq + Lk) log(Lq + Lk) C)."""
    lk = x.shape[-2]
    size = 1 << math.ceil(math.log2(max(2, lq + lk - 1)))
    # circular convolution of length `size`: the kernel's offset r = i - j sits at index r mod size
    ker = torch.zeros(kernel.shape[0], size, dtype=kernel.dtype, device=kernel.device)
    ker[:, :lq] = kernel[:, lk - 1:]  # offsets 0 .. lq-1
    if lk > 1:
        ker[:, size - (lk - 1):] = kernel[:, : lk - 1]  # offsets -(lk-1) .. -1
    spectrum = torch.fft.rfft(ker, n=size)[None, :, None, :]  # (1, H, 1, F)
    xs = torch.fft.rfft(x.transpose(-1, -2), n=size, dim=-1)  # (B, H, C, F): transforms along the sequence
    return torch.fft.irfft(xs * spectrum, n=size, dim=-1)[..., :lq].transpose(-1, -2)
