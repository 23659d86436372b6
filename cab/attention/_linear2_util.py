"""Private helpers of the issue-8 (part 2) linear attentions: unnormalised prefix products of feature maps
(chunked, no L x L tensor), depthwise 1-D convolutions over the sequence (the local terms of InLine and
Agent Attention), the Toeplitz product by FFT (kernelized attention with RPE), seeded parameter
initialisation and the small decoding-state helpers. The loader skips this module (leading underscore)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 64  # rows per chunk of the causal prefix products


def seeded_normal(shape: "tuple[int, ...]", seed: int, std: float = 1.0, salt: int = 0) -> torch.Tensor:
    """A deterministic N(0, std^2) tensor in the default dtype from a generator seeded by (seed, salt)."""
    generator = torch.Generator().manual_seed(int(seed) * 1000003 + salt)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * std).to(torch.get_default_dtype())


def nonzero(den: torch.Tensor) -> torch.Tensor:
    """den with exact zeros replaced by 1 (rows that see no key have a zero numerator too)."""
    return torch.where(den != 0, den, torch.ones_like(den))


def real_keys(key_padding_mask: "torch.Tensor | None", batch: int, length: int,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, 1) float: 1 for real keys, 0 for padded ones."""
    if key_padding_mask is None:
        return torch.ones(1, 1, length, 1, device=device, dtype=dtype)
    return (~key_padding_mask.bool()).to(dtype)[:, None, :, None]


def full_products(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_j (a_i . b_j) v_j for every row i, as a (b^T v): a (B, H, Lq, m), b (B, H, Lk, m), v (B, H, Lk, n)."""
    return a @ (b.transpose(-1, -2) @ v)


def causal_products(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """sum_{j <= t} (a_t . b_j) v_j for every row t (Lq == Lk), unnormalised, computed in chunks: the C x C
    lower-triangular block of a b^T within a chunk is explicit, the earlier chunks enter through an
    exclusive cumulative sum of the per-chunk states b^T v. Time O(L (C + m) n), memory O(L m n / C).
    Appending a column of ones to v gives the normaliser sum_{j <= t} a_t . b_j in the last column."""
    batch, heads, length, m = a.shape
    n = v.shape[-1]
    pad = (-length) % chunk
    if pad:
        a, b, v = (F.pad(t, (0, 0, 0, pad)) for t in (a, b, v))
    count = (length + pad) // chunk
    ac = a.reshape(batch, heads, count, chunk, m)
    bc = b.reshape(batch, heads, count, chunk, m)
    vc = v.reshape(batch, heads, count, chunk, n)
    states = bc.transpose(-1, -2) @ vc  # (B, H, N, m, n)
    prev = F.pad(states.cumsum(dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).tril()
    weights = (ac @ bc.transpose(-1, -2)).masked_fill(~tril, 0.0)
    out = ac @ prev + weights @ vc
    return out.reshape(batch, heads, count * chunk, n)[:, :, :length]


def causal_products_flops(batch: int, heads: int, length: int, m: int, n: int, chunk: int = CHUNK) -> int:
    """Matmul FLOPs of causal_products (as FlopCounterMode counts them)."""
    padded = -(-length // chunk) * chunk
    return 2 * batch * heads * padded * (m * n + chunk * m + m * n + chunk * n)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """v with a trailing column of ones (its products give the normaliser)."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


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
