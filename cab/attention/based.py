"""BASED: linear attention with the 2nd-order Taylor feature map on a small projected dimension, beside a
small sliding-window softmax attention; the recurrent state is the Taylor KV state plus the window's
KV cache, which is what the recall-vs-state-size comparison measures."""

from __future__ import annotations

import torch
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.feature_map import seeded_normal
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prefix_sums import causal_products, causal_products_flops, full_products, with_ones
from cab.attention.engine.prepare import align_bottom_right, compute_dtype, key_weights, nonzero, softmax_scale
from cab.attention.local import LocalAttention
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention

_CROSS = ("the sliding-window branch needs queries and keys on one position axis; two different sequences "
          "share no positions (the Taylor branch alone would be a different mechanism)")


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x / f^(1/4), vec(x x^T) / (sqrt(2) sqrt(f))] for x (..., f): phi(q) . phi(k) =
    1 + q.k / sqrt(f) + (q.k)^2 / (2 f), the 2nd-order Taylor expansion of exp(q.k / sqrt(f))."""
    f = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * (0.5 ** 0.5 / f ** 0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x * f ** -0.25, outer], dim=-1)


@register_attention(
    "based", patterns=("NS", "CS"), family="linear", exact=False, mechanism="M20",
    citation="Arora et al., Simple linear attention language models balance the recall-throughput tradeoff, "
    "ICML 2024",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class BasedAttention(Attention):
    """BASED (paper Sec. 4; [BG] the feature map as in the HazyResearch and fla code):

    - Taylor linear branch: q and k are projected per head to `feature_dim` (f, paper default 16) by a
      learned (d, f) matrix P (cab's q, k arrive at head_dim, the paper projects the layer input straight
      to f; P is shared by q and k and initialised Gaussian so that (Pq).(Pk) / sqrt(f) is an unbiased
      estimate of q.k / sqrt(d)), mapped by phi(x) = [1, x/f^(1/4), (x (x) x)/(sqrt 2 sqrt f)] (1 + f + f^2
      features, 273 at f = 16; phi(q).phi(k) = 1 + s + s^2/2 > 0 with s = (Pq).(Pk)/sqrt(f)), and used in
      normalised linear attention phi(q_i) sum_j phi(k_j) v_j^T / phi(q_i) sum_j phi(k_j).
    - Sliding-window softmax branch: exact softmax(q k^T / sqrt(d)) over the `window` (paper default 64)
      most recent keys in CS (positions p-window+1..p), and over |p - j| <= window // 2 in NS, computed by
      cab's `local` attention.
    - Combination [EJ]: the paper stacks the two primitives as separate layers whose outputs both add to
      the residual stream; as one operator cab returns their mean, (linear + window) / 2, so the output
      stays a convex combination of values like every other attention's.

    CS is bottom-right aligned when Lq != Lk (query i at key position i + Lk - Lq); padded keys get zero
    Taylor features and are invisible to the window; a row with no visible key outputs 0. NC/CC are
    unsupported (see the reason). Efficient form: NS from the global sums, CS by chunked prefix products
    (no L x L tensor); the window branch is O(L window). Decoding state = the Taylor state sum phi(k) [v, 1]
    ((1 + f + f^2) x (d_v + 1) per head, constant in the length) plus a ring buffer holding the last
    `window` keys and values: its size is what decode_state_bytes reports.
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, feature_dim: int = 16, window: int = 64, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if feature_dim < 1 or window < 1:
            raise ValueError(f"feature_dim and window must be positive, got {feature_dim} and {window}")
        self.feature_dim, self.window, self.seed = feature_dim, window, seed
        std = feature_dim ** -0.5 * (feature_dim / head_dim) ** 0.25
        self.proj = nn.Parameter(seeded_normal((num_heads, head_dim, feature_dim), seed, std))
        half_width = window - 1 if self.causal else window // 2
        self.local = LocalAttention(pattern, num_heads, head_dim, window=half_width)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}, window={self.window}, seed={self.seed}"

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.to(x.dtype)  # (B, H, L, d) @ (H, d, f)

    def _taylor(self, q, k, v, key_padding_mask):
        """The normalised Taylor linear branch (q, k, v at the query heads, CS already aligned)."""
        phi_q = taylor_features(self._project(q))
        phi_k = taylor_features(self._project(k)) * key_weights(
            key_padding_mask, k.shape[0], k.shape[-2], k.device, k.dtype
        )
        if self.pattern is Pattern.CS:
            both = causal_products(phi_q, phi_k, with_ones(v))
        else:
            both = full_products(phi_q, phi_k, with_ones(v))
        return both[..., :-1] / nonzero(both[..., -1:])

    def forward(self, q, k, v, key_padding_mask=None):
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype)
        window = self.local(q, k, v, key_padding_mask)
        drop, mask = 0, key_padding_mask
        if self.pattern is Pattern.CS:
            q, k, v, mask, drop = align_bottom_right(q, k, v, key_padding_mask)
        linear = self._taylor(q, k, v, mask)[:, :, drop:]
        return (0.5 * (linear + window)).to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk Taylor kernel 1 + s + s^2/2 (s = (Pq).(Pk)/sqrt(f)) masked by the pattern and
        padding and row-normalised, times V; the window branch by `local`'s row-by-row reference; mean."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        s = self._project(q) @ self._project(k).transpose(-1, -2) / self.feature_dim ** 0.5
        mask = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        kernel = (1 + s + 0.5 * s * s) * mask
        den = kernel.sum(dim=-1, keepdim=True)
        linear = (kernel @ v) / nonzero(den)
        return 0.5 * (linear + self.local.reference(q, k, v, key_padding_mask))

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        h, d, f = self.num_heads, self.head_dim, self.feature_dim
        features = 1 + f + f * f
        flops = 2 * batch * h * (lq + lk) * d * f  # the projections
        if self.pattern is Pattern.CS:
            flops += causal_products_flops(batch, h, max(lq, lk), features, d + 1)
        else:
            flops += 2 * batch * h * (lk + lq) * features * (d + 1)
        # the window branch as cab's `local` computes it: query blocks against their key span
        block, blocks, span, _ = self.local._geometry(lq, lk)
        return flops + 2 * batch * h * blocks * block * span * 2 * d

    # decoding -------------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """The Taylor state {kv: sum phi(Pk) [v, 1]^T (B, H, F, d_v + 1)} of the real context tokens, and the
        window's ring buffer {keys, values (B, Hkv, window, d), real (B, window)} holding the last window-1
        context tokens, token t in slot t mod window; `count` tokens seen. Only CS decodes."""
        if self.pattern is not Pattern.CS:
            raise ValueError(f"incremental decoding applies to CS, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = k.to(dtype), v.to(dtype)
        batch, kv_heads, length, dim = k.shape
        real = key_weights(key_padding_mask, batch, length, k.device, dtype)
        kh, vh = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)
        phi_k = taylor_features(self._project(kh)) * real
        kv = phi_k.transpose(-1, -2) @ with_ones(vh)
        w = self.window
        keys = k.new_zeros(batch, kv_heads, w, dim)
        values = v.new_zeros(batch, kv_heads, w, v.shape[-1])
        ok = torch.zeros(batch, w, dtype=torch.bool, device=k.device)
        start = max(0, length - (w - 1))
        slots = torch.arange(start, length, device=k.device) % w
        keys[:, :, slots], values[:, :, slots] = k[:, :, start:], v[:, :, start:]
        ok[:, slots] = (real[:, 0, start:, 0] > 0).expand(batch, -1)
        return {"kv": kv, "keys": keys, "values": values, "real": ok, "count": length}

    def decode_step(self, state, q, k=None, v=None):
        check_step_inputs(self, k, v)
        out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        kh, vh = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)
        kv = state["kv"] + taylor_features(self._project(kh)).transpose(-1, -2) @ with_ones(vh)
        both = taylor_features(self._project(q)) @ kv
        linear = both[..., :-1] / nonzero(both[..., -1:])
        # window: write the new token over the slot of the token leaving the window (in place)
        slot = state["count"] % self.window
        keys, values, ok = state["keys"], state["values"], state["real"]
        keys[:, :, slot], values[:, :, slot], ok[:, slot] = k[:, :, 0], v[:, :, 0], True
        scores = (q @ repeat_kv(keys, self.num_heads).transpose(-1, -2)) * softmax_scale(q.shape[-1])
        scores = scores.masked_fill(~ok[:, None, None, :], float("-inf"))
        window = torch.softmax(scores, dim=-1) @ repeat_kv(values, self.num_heads)
        new = {"kv": kv, "keys": keys, "values": values, "real": ok, "count": state["count"] + 1}
        return (0.5 * (linear + window)).to(out_dtype), new
