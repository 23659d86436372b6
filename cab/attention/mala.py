"""MALA, magnitude-aware linear attention: linear attention whose weights beta_i s_ij - gamma_i keep the
query's magnitude (they sharpen as |phi(q)| grows) and still sum to one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prefix_sums import (
    DEFAULT_BLOCK,
    SEQ_CHUNK,
    chunks,
    decayed_causal_product,
    tiled_product_flops,
)
from cab.attention.engine.prepare import compute_dtype, key_weights, nonzero, prepare, zero_padded
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention


def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


@register_attention(
    "mala", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M12",
    citation="Fan, Huang, Ai & He, Rectifying Magnitude Neglect in Linear Attention (MALA), ICCV 2025",
)
class MALAAttention(Attention):
    """Magnitude-Aware Linear Attention (paper Sec. 4). With phi = ELU + 1, s_ij = scale phi(q_i).phi(k_j)
    and N_i the number of keys row i sees:

        z_i = sum_j s_ij / N_i,  beta_i = 1 + 1 / z_i,  gamma_i = z_i / N_i,  a_ij = beta_i s_ij / N_i - gamma_i,
        O_i = sum_j a_ij v_j = beta_i scale phi(q_i)^T (sum_j phi(k_j) v_j^T) / N_i - z_i (sum_j v_j) / N_i.

    Each row's weights sum to 1 (beta_i z_i - z_i = 1); scaling phi(q_i) up scales z_i, which pushes
    beta_i towards 1 and gamma_i up: the distribution sharpens with the query's magnitude, as softmax's
    does, where plain linear attention is invariant to it. Weights can be negative.

    [BG] Formula and scale = 1/sqrt(d) follow the authors' released code (z = scale phi(q) mean(phi(K));
    KV = scale phi(K)^T V / N; out = phi(q) KV (1 + 1/z) - z mean(V)), without its 1e-6 added to z (z > 0
    since ELU + 1 > 0) and without the rotary terms it adds to the numerator, its LePE convolution, gate
    and projections (not part of the operator). Causal patterns: the paper is noncausal (vision); the
    prefix form replaces N by the count of keys row i sees, so every sum is a prefix sum (CS, tiled causal
    product for phi(q).sum phi(k) v and phi(q).sum phi(k), cumulative sums for sum v and the count;
    bottom-right aligned when Lq != Lk). NC and CC use all keys for every row; no row reads another query,
    so CC holds. Padded keys are left out of every sum and of N; a row that sees no key outputs 0.
    Decoding keeps (sum phi(k) v^T, sum phi(k), sum v, N).
    """

    def __init__(self, pattern, num_heads, head_dim, scale: "float | None" = None, block_size: int = DEFAULT_BLOCK):
        super().__init__(pattern, num_heads, head_dim)
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.scale = head_dim ** -0.5 if scale is None else float(scale)
        self.block_size = block_size
        self.seq_chunk = block_size * max(1, SEQ_CHUNK // block_size)  # tokens per chunk of the sequence loop

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:.4g}, block_size={self.block_size}"

    def _combine(self, qs, qk_sum, v_sum, count):
        """O from phi(q).S (.., Dv), phi(q).P (.., 1), sum v (.., Dv) and the key count N (.., 1)."""
        n = nonzero(count)
        z = self.scale * qk_sum / n
        seen = count > 0
        out = (1.0 + 1.0 / torch.where(seen, z, torch.ones_like(z))) * self.scale * qs / n - z * v_sum / n
        return torch.where(seen, out, torch.zeros_like(out))

    def forward(self, q, k, v, key_padding_mask=None):
        """Over chunks of `seq_chunk` tokens: CS carries the tiled product's state, sum v and the count
        across chunks; the other patterns sum the key summaries over key chunks, then read them per query
        chunk."""
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        heads, size = q.shape[1], self.seq_chunk

        def keys(a, b):
            pad = None if key_padding_mask is None else key_padding_mask[:, a:b]
            real = key_weights(pad, k.shape[0], b - a, k.device, k.dtype)
            return _phi(zero_padded(k[:, :, a:b], pad)) * real, v[:, :, a:b] * real, real

        outs = []
        if self.pattern is Pattern.CS:
            state, v_carry, n_carry = None, 0, 0
            for a, b in chunks(q.shape[-2], size):
                phi_q = _phi(q[:, :, a:b])
                phi_k, values, real = keys(a, b)
                both, state = decayed_causal_product(
                    phi_q, phi_k, torch.cat([values, torch.ones_like(values[..., :1])], dim=-1), None,
                    self.block_size, state=state, return_state=True)
                v_sum = values.cumsum(dim=-2) + v_carry
                count = real.expand(-1, heads, -1, -1).cumsum(dim=-2) + n_carry
                v_carry, n_carry = v_sum[:, :, -1:], count[:, :, -1:]
                outs.append(self._combine(both[..., :-1], both[..., -1:], v_sum, count))
        else:
            s = p = v_sum = count = 0
            for a, b in chunks(k.shape[-2], size):
                phi_k, values, real = keys(a, b)
                s = s + phi_k.transpose(-1, -2) @ values
                p = p + phi_k.sum(dim=-2).unsqueeze(-1)
                v_sum = v_sum + values.sum(dim=-2, keepdim=True)
                count = count + real.sum(dim=-2, keepdim=True)
            for a, b in chunks(q.shape[-2], size):
                phi_q = _phi(q[:, :, a:b])
                outs.append(self._combine(phi_q @ s, phi_q @ p, v_sum, count))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk weights a_ij = beta_i s_ij / N_i - gamma_i on the visible keys (0 elsewhere),
        with N_i, z_i counted and summed over the visible keys, times V."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        visible = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device).to(q.dtype)
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        s = self.scale * (_phi(q) @ _phi(k).transpose(-1, -2)) * visible
        count = visible.sum(dim=-1, keepdim=True)
        n = nonzero(count)
        z = s.sum(dim=-1, keepdim=True) / n
        beta = 1.0 + 1.0 / torch.where(count > 0, z, torch.ones_like(z))
        weights = (beta * s / n - z / n) * visible
        return weights @ v

    # decoding: (S = sum phi(k) v^T, P = sum phi(k), V = sum v, N) per (batch, head) -------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(device=k.device, dtype=torch.bool)
        real = key_weights(key_padding_mask, k.shape[0], k.shape[-2], k.device, k.dtype)
        phi_k, v = _phi(zero_padded(k, key_padding_mask)) * real, v * real
        count = real.expand(-1, self.num_heads, -1, -1).sum(dim=-2, keepdim=True)
        return phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=-2, keepdim=True), v.sum(dim=-2, keepdim=True), count

    def decode_step(self, state, q, k=None, v=None):
        s, p, v_sum, count = state
        out_dtype = q.dtype
        if k is not None:
            k, v = repeat_kv(k, self.num_heads).to(s.dtype), repeat_kv(v, self.num_heads).to(s.dtype)
            phi_k = _phi(k)
            s, p, v_sum, count = s + phi_k.transpose(-1, -2) @ v, p + phi_k, v_sum + v, count + 1
        phi_q = _phi(q.to(s.dtype))
        out = self._combine(phi_q @ s, (phi_q * p).sum(dim=-1, keepdim=True), v_sum, count)
        return out.to(out_dtype), (s, p, v_sum, count)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        d, h = self.head_dim, self.num_heads
        if self.pattern is Pattern.CS:
            return tiled_product_flops(batch, h, max(lq, lk), d, d + 1, self.block_size)
        return 2 * batch * h * (lk * d * d + lq * d * d + lq * d)

    complexity = {"time": 1, "memory": 1}
