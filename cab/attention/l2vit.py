"""L2ViT: enhanced linear global attention (ReLU kernel, clamped normaliser, learned temperature, plus the
local concentration module) beside local window attention (softmax inside non-overlapping windows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.convolution import depthwise_conv, depthwise_conv_reference
from cab.attention.engine.feature_map import seeded_normal
from cab.attention.engine.prefix_sums import full_products, with_ones
from cab.attention.engine.prepare import compute_dtype, key_weights, softmax_scale
from cab.patterns import attention_mask
from cab.registry import register_attention

_CROSS = ("the local window branch and the local concentration module need queries and keys on one position "
          "axis; two different sequences share no positions")
_CAUSAL = ("L2ViT is a noncausal vision design, and its local concentration module convolves neighbouring "
           "output rows: a causal version's decoder would have to carry earlier queries' outputs, which cab's "
           "decoding contract (a state prefilled from keys and values only) cannot rebuild; cab does not "
           "declare a causal variant it cannot decode")


@register_attention(
    "l2vit", patterns=("NS",), family="linear", exact=False, mechanism="M18",
    citation="Zheng, The Linear Attention Resurrection in Vision Transformer, arXiv 2501.16182 (2025)",
    unsupported={"CS": _CAUSAL, "NC": _CROSS, "CC": _CROSS},
)
class L2ViTAttention(Attention):
    """L2ViT's two attentions ([BG] checked against the authors' code), as one operator:

    - Enhanced linear global attention (LGA): a_i = t_h ReLU(q_i) sum_j ReLU(k_j) v_j^T /
      max(ReLU(q_i) . sum_j ReLU(k_j), `denominator_floor`) with a learned per-head temperature t_h
      (init d^-1/2) and the authors' clamp of the normaliser at 100 ("makes training stable"), followed by
      the local concentration module LCM(a) = DWConv2(GELU(DWConv1(a))), depthwise convolutions over the
      output rows with `lcm_kernel` taps (paper 7x7, here 1-D) and learned seeded weights, added as a
      residual: a + LCM(a). The LCM's BatchNorm is left out: at inference it is a per-channel affine map
      the second convolution absorbs, and its batch statistics would mix batch elements.
    - Local window attention (LWA): softmax(q k^T / sqrt(d)) within non-overlapping windows of `window`
      positions (paper 7 x 7 = 49 patches, here 49 consecutive positions).
    - Combination [EJ]: the paper alternates LWA and LGA blocks; as one operator cab returns the mean
      (LWA + LGA + LCM(LGA)) / 2.

    In NS with Lq == Lk the padding mask marks padded positions of the one sequence, so those rows are
    zeroed at both LCM convolutions' inputs (they must not reach real neighbours).

    NS only (see the reasons for the others): the linear branch from the global sums, O(L d d_v); the window
    branch O(L window d); the LCM O(L K d). With Lq != Lk query i and key i sit at position i. Padded keys
    enter no sum and no window; a row that sees no key outputs 0 (the LCM has no bias and only mixes rows
    whose linear output is zero then).
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, window: int = 49, lcm_kernel: int = 7,
                 denominator_floor: float = 100.0, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if window < 1 or lcm_kernel < 1 or lcm_kernel % 2 == 0 or denominator_floor <= 0:
            raise ValueError("window must be positive, lcm_kernel odd and positive, denominator_floor positive")
        self.window, self.lcm_kernel, self.seed = window, lcm_kernel, seed
        self.denominator_floor = float(denominator_floor)
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), head_dim ** -0.5))
        std = lcm_kernel ** -0.5
        self.lcm1 = nn.Parameter(seeded_normal((num_heads, head_dim, lcm_kernel), seed, std, salt=1))
        self.lcm2 = nn.Parameter(seeded_normal((num_heads, head_dim, lcm_kernel), seed, std, salt=2))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, window={self.window}, lcm_kernel={self.lcm_kernel}, "
                f"denominator_floor={self.denominator_floor}, seed={self.seed}")

    # branches -------------------------------------------------------------------------------------------

    def _lcm(self, a: torch.Tensor, rows: "torch.Tensor | float", reference: bool = False) -> torch.Tensor:
        """DWConv2(GELU(DWConv1(a))) with the rows marked 0 in `rows` zeroed at both convolutions' inputs,
        as if they were absent (zero padding)."""
        conv = depthwise_conv_reference if reference else depthwise_conv
        return conv(F.gelu(conv(a * rows, self.lcm1, causal=False)) * rows, self.lcm2, causal=False)

    @staticmethod
    def _query_rows(key_padding_mask, lq: int, lk: int, dtype) -> "torch.Tensor | float":
        """1/0 per query row entering the LCM: with Lq == Lk the padding mask marks padded positions of the
        one sequence, queries included, whose (garbage) rows must not reach their neighbours' outputs."""
        if key_padding_mask is None or lq != lk:
            return 1.0
        return (~key_padding_mask.bool()).to(dtype)[:, None, :, None]

    def _global(self, q, k, v, real):
        """a = t ReLU(q) S / max(ReLU(q) . z, floor)."""
        phi_q, phi_k = torch.relu(q), torch.relu(k) * real
        both = full_products(phi_q, phi_k, with_ones(v))
        den = both[..., -1:].clamp(min=self.denominator_floor)
        return self.temperature.to(q.dtype) * both[..., :-1] / den

    def _windows(self, q, k, v, key_padding_mask):
        """Softmax inside windows of `window` positions; q, k, v of one length L. Returns (B, H, L, dv)."""
        batch, heads, length, dim = q.shape
        w = self.window
        total = -(-length // w) * w
        front, back = 0, total - length
        real = torch.ones(batch, length, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            real = ~key_padding_mask.bool()
        real = F.pad(real, (front, back), value=False).reshape(batch, 1, total // w, 1, w)
        qb, kb, vb = (F.pad(x, (0, 0, front, back)).reshape(batch, heads, total // w, w, x.shape[-1])
                      for x in (q, k, v))
        scores = (qb @ kb.transpose(-1, -2)) * softmax_scale(dim)  # (B, H, N, w, w)
        visible = real.expand(batch, 1, total // w, w, w)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        probs = torch.where(visible.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
        out = (probs @ vb).reshape(batch, heads, total, -1)
        return out[:, :, :length]

    def forward(self, q, k, v, key_padding_mask=None):
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype)
        lq, lk = q.shape[-2], k.shape[-2]
        rows = self._query_rows(key_padding_mask, lq, lk, dtype)
        length = max(lq, lk)  # query i and key i at position i: pad the shorter side at the end
        if lk < length:
            if key_padding_mask is None:
                key_padding_mask = torch.zeros(k.shape[0], lk, dtype=torch.bool, device=k.device)
            key_padding_mask = F.pad(key_padding_mask.bool(), (0, length - lk), value=True)
            k, v = F.pad(k, (0, 0, 0, length - lk)), F.pad(v, (0, 0, 0, length - lk))
        q = F.pad(q, (0, 0, 0, length - lq))
        real = key_weights(key_padding_mask, k.shape[0], k.shape[-2], k.device, dtype)
        a = self._global(q, k, v, real)
        a = a[:, :, :lq]
        out = 0.5 * (self._windows(q, k, v, key_padding_mask)[:, :, :lq] + a + self._lcm(a, rows))
        return out.to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Dense: the explicit Lq x Lk ReLU kernel (masked by the pattern and padding) for LGA with its clamped
        normaliser; the LCM by loops over the taps; the window softmax with an explicit same-window mask."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        visible = attention_mask(self.pattern, lq, lk, key_padding_mask, q.device)  # (B|1, 1, Lq, Lk)
        kernel = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * visible
        den = kernel.sum(dim=-1, keepdim=True).clamp(min=self.denominator_floor)
        a = self.temperature.to(q.dtype) * (kernel @ v) / den
        pos_q = torch.arange(lq, device=q.device)
        pos_k = torch.arange(lk, device=q.device)
        same = torch.div(pos_q[:, None], self.window, rounding_mode="floor") == \
            torch.div(pos_k[None, :], self.window, rounding_mode="floor")
        local_visible = visible & same
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        probs = torch.softmax(scores.masked_fill(~local_visible, float("-inf")), dim=-1)
        probs = torch.where(local_visible.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
        rows = self._query_rows(key_padding_mask, lq, lk, q.dtype)
        return 0.5 * (probs @ v + a + self._lcm(a, rows, reference=True))
