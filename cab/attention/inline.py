"""InLine: injective linear attention (a mean-subtracted instead of divided-by-the-sum linear kernel,
so rows sum to one and distinct queries give distinct weight rows) plus a local attention residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.convolution import depthwise_conv, depthwise_conv_reference
from cab.attention.engine.feature_map import seeded_normal
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prefix_sums import causal_products, causal_products_flops
from cab.attention.engine.prepare import compute_dtype, key_weights, nonzero, prepare, softmax_scale
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention


@register_attention(
    "inline", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M16",
    citation="Han et al., Bridging the Divide: Reconsidering Softmax and Linear Attention, NeurIPS 2024",
)
class InLineAttention(Attention):
    """InLine attention (paper Eq. 5 and Sec. 5; the official code's DeiT layer): with the identity kernel
    and s = 1/sqrt(d), the weight of key j in row i over the N_i keys the row sees is

        a_ij = (s / N_i) (q_i . k_j - q_i . mean_{s seen} k_s) + 1 / N_i,

    so every row sums to 1 and the map from queries to weight rows is injective (the softmax-free kernel
    is shifted, not normalised). Output: O_i = sum_j a_ij v_j + local residual. The local term ("local
    attention residual", paper Sec. 5) is a per-channel 3-tap neighbourhood mixing of the values, here a
    depthwise 1-D convolution of V with learned weights (H, d, `local_kernel`) [EJ]: the paper predicts
    its 3x3 weights per image with an MLP from the token average, which pools over every query and would
    break query-side causality, so cab learns them as static parameters (seeded init, `seed`). NS: taps
    i-1, i, i+1; CS: taps i-2, i-1, i (causal). The cross patterns (NC, CC) have no shared position axis
    between queries and keys, so the local term is omitted there and InLine is the injective linear part
    alone. `local_kernel=0` disables the term everywhere.

    Efficient form: NS/NC/CC from the key summaries S = sum k v^T, sum k, sum v and the count N of real
    keys; CS with the prefix forms (chunked prefix products for q . S_t, cumulative sums for the others),
    bottom-right aligned when Lq != Lk (query i sits at key position i + Lk - Lq); NS with Lq != Lk aligns
    the local term top-left. Padded keys enter no sum, no count and no convolution tap; a row with no
    visible key outputs 0. Decoding keeps (S, sum k, sum v, N) and the last `local_kernel - 1` values.
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, local_kernel: int = 3, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if local_kernel < 0 or (local_kernel and local_kernel % 2 == 0):
            raise ValueError(f"local_kernel must be 0 or odd and positive, got {local_kernel}")
        self.local_kernel, self.seed = local_kernel, seed
        self.local = None
        if local_kernel and not self.cross:
            self.local = nn.Parameter(seeded_normal((num_heads, head_dim, local_kernel), seed, 0.3))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, local_kernel={self.local_kernel}, seed={self.seed}"

    def _local(self, v: torch.Tensor, real: torch.Tensor, lq: int, reference: bool = False) -> torch.Tensor:
        """The local residual for the first lq positions (zeros past the keys), padded values zeroed."""
        conv = depthwise_conv_reference if reference else depthwise_conv
        out = conv(v * real, self.local, causal=self.causal)[:, :, :lq]
        if out.shape[-2] < lq:
            out = F.pad(out, (0, 0, 0, lq - out.shape[-2]))
        return out

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        dtype = q.dtype
        scale = softmax_scale(q.shape[-1])
        lq, lk = q.shape[-2], k.shape[-2]
        real = key_weights(key_padding_mask, q.shape[0], lk, q.device, dtype)
        kr, vr = k * real, v * real
        if self.pattern is Pattern.CS:
            count = real.cumsum(dim=-2)  # (B|1, 1, L, 1)
            ksum, vsum = kr.cumsum(dim=-2), vr.cumsum(dim=-2)
            qs = causal_products(q, kr, v)
        else:
            count = real.sum(dim=-2, keepdim=True)
            ksum, vsum = kr.sum(dim=-2, keepdim=True), vr.sum(dim=-2, keepdim=True)
            qs = q @ (kr.transpose(-1, -2) @ v)
        inv = 1.0 / nonzero(count)
        qk = (q * ksum).sum(dim=-1, keepdim=True)  # q_i . sum k
        out = scale * inv * (qs - qk * vsum * inv) + vsum * inv
        if self.local is not None:
            out = out + self._local(v, real, lq)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk weight matrix a_ij over the visible keys (mean-subtracted, + 1/N_i), times V,
        plus the local residual as a loop over the convolution taps."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        visible = attention_mask(self.pattern, lq, lk, key_padding_mask, q.device).to(q.dtype)  # (B|1,1,Lq,Lk)
        count = visible.sum(dim=-1, keepdim=True)
        inv = torch.where(count > 0, 1.0 / nonzero(count), torch.zeros_like(count))
        scores = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])
        mean = (scores * visible).sum(dim=-1, keepdim=True) * inv
        weights = ((scores - mean) * inv + inv) * visible
        out = weights @ v
        if self.local is not None:
            real = key_weights(key_padding_mask, q.shape[0], lk, q.device, q.dtype)
            if self.pattern is Pattern.CS and lq != lk:  # bottom-right: query i at key position i + lk - lq
                local = depthwise_conv_reference(v * real, self.local, causal=True)
                if lq <= lk:
                    local = local[:, :, lk - lq:]
                else:
                    local = F.pad(local, (0, 0, lq - lk, 0))
            else:
                local = self._local(v, real, lq, reference=True)
            out = out + local
        return out

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        h, d = self.num_heads, self.head_dim
        conv = 0
        if self.pattern is Pattern.CS:
            length = max(lq, lk)
            flops = causal_products_flops(batch, h, length, d, d)
            conv = 2 * batch * h * d * length * self.local_kernel
        else:
            flops = 2 * batch * h * d * d * (lk + lq)
            if self.pattern is Pattern.NS:
                conv = 2 * batch * h * d * lk * self.local_kernel
        return flops + (conv if self.local is not None else 0)

    # decoding -------------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """{S = sum k v^T, K = sum k, V = sum v, N = real keys, tail = the last local_kernel - 1 values
        (CS, zeros for padded or absent tokens)} of the context (CS) or the memory (CC)."""
        if not self.causal:
            raise ValueError(f"incremental decoding applies to CS and CC, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        real = key_weights(key_padding_mask, k.shape[0], k.shape[-2], k.device, dtype)
        kr, vr = k * real, v * real
        state = {"S": kr.transpose(-1, -2) @ v, "K": kr.sum(dim=-2), "V": vr.sum(dim=-2),
                 "N": real.sum(dim=-2).expand(k.shape[0], 1, 1).clone(memory_format=torch.contiguous_format)}
        if self.local is not None:
            taps = self.local_kernel - 1
            tail = vr[:, :, max(0, vr.shape[-2] - taps):]
            state["tail"] = F.pad(tail, (0, 0, taps - tail.shape[-2], 0))
        return state

    def decode_step(self, state, q, k=None, v=None):
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        q = q.to(dtype)[:, :, 0]
        check_step_inputs(self, k, v)
        if not self.cross:
            k, v = repeat_kv(k, self.num_heads).to(dtype)[:, :, 0], repeat_kv(v, self.num_heads).to(dtype)[:, :, 0]
            new = {"S": state["S"] + k.unsqueeze(-1) * v.unsqueeze(-2), "K": state["K"] + k,
                   "V": state["V"] + v, "N": state["N"] + 1}
            if self.local is not None:
                new["tail"] = torch.cat([state["tail"], v.unsqueeze(-2)], dim=-2)
            state = new
        scale = softmax_scale(q.shape[-1])
        inv = 1.0 / nonzero(state["N"])  # (B, 1, 1)
        qs = (q.unsqueeze(-2) @ state["S"]).squeeze(-2)
        qk = (q * state["K"]).sum(dim=-1, keepdim=True)
        out = scale * inv * (qs - qk * state["V"] * inv) + state["V"] * inv
        if self.local is not None:
            window = state["tail"]  # (B, H, taps, Dv), the last entry is the current token
            out = out + (window * self.local.to(dtype).permute(0, 2, 1)).sum(dim=-2)
            state = dict(state, tail=window[:, :, 1:].clone())
        return out.unsqueeze(-2).to(out_dtype), state
