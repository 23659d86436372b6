"""LightNet's additive linear recurrence: per-feature softmax-normalised key weights accumulated over the
sequence (no multiplicative decay), read out by SiLU queries; chunked prefix form for causal self."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.feature_map import shifted_exp
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prefix_sums import causal_products, causal_products_flops
from cab.attention.engine.prepare import compute_dtype, nonzero, prepare
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention


@register_attention(
    "lightnet", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M22",
    citation="Qin et al., You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet, "
    "arXiv 2405.21022 (2024)",
)
class LightNetAttention(Attention):
    """LightNet's additive linear recurrence (the attention core of the LightNet layer).

    Math ([BG], the recurrence of the paper's additive form as the fla `lightnet` layer computes it):
    z_t = logcumsumexp(k)_t (per feature), k~_t = exp(k_t - z_t), S_t = exp(z_{t-1} - z_t) S_{t-1} +
    k~_t v_t^T, o_t = silu(q_t)^T S_t. Unrolled, S_t = sum_{s<=t} softmax_{s<=t}(k_s) v_s^T with the
    softmax taken per key feature over the prefix: the state is a per-feature convex combination of the
    values, growing additively (no decay). Noncausal (NS, NC) and causal cross (CC: every query reads
    the same summary of all keys, nothing from other queries): S = softmax_seq(K)^T V over all real keys,
    O = silu(Q) S, which is order-independent. The layer's output gate, normalisation and the MD-TPE /
    MD-LRPE position encodings live outside the attention operator and are not part of this module.

    Efficient form: CS is o_t = sum_{s<=t} ((silu(q_t) / Z_t) . e_s) v_s with e_s = exp(k_s - c) and
    Z_t = sum_{s<=t} e_s (a cumulative sum of O(L d)), computed by chunked prefix products (no L x L
    tensor); bottom-right aligned when Lq != Lk. The shift c is a detached per-feature maximum over the
    real keys; it cancels exactly, and (spanning later keys too) could reach an earlier row only through
    floating-point underflow. Padded keys get zero weight; a row with no visible key outputs 0.
    Decoding keeps (A = sum e_s v_s^T, Z = sum e_s) under a running maximum, O(d d_v) per head.
    """

    complexity = {"time": 1, "memory": 1}

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        if self.pattern is Pattern.CS:
            e = shifted_exp(k, key_padding_mask)
            phi_q = F.silu(q) / nonzero(e.cumsum(dim=-2))
            return causal_products(phi_q, e, v)[:, :, drop:].to(out_dtype)
        e = shifted_exp(k, key_padding_mask)
        phi_q = F.silu(q) / nonzero(e.sum(dim=-2, keepdim=True))
        return (phi_q @ (e.transpose(-1, -2) @ v)).to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Dense form: for every (row, key, feature) the softmax over the keys the row sees, per feature;
        the per-row state S_i = sum_j w_ij v_j^T built explicitly (B, H, Lq, D, Dv); o_i = silu(q_i) S_i."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        visible = attention_mask(self.pattern, lq, lk, key_padding_mask, q.device)[..., None]  # (B|1, 1, Lq, Lk, 1)
        logits = k.unsqueeze(2).expand(-1, -1, lq, -1, -1).masked_fill(~visible, float("-inf"))
        weights = torch.softmax(logits, dim=-2)
        weights = torch.where(visible.any(dim=-2, keepdim=True), weights, torch.zeros_like(weights))
        state = torch.einsum("bhijd,bhje->bhide", weights, v)
        return torch.einsum("bhid,bhide->bhie", F.silu(q), state)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        h, d = self.num_heads, self.head_dim
        if self.pattern is Pattern.CS:
            return causal_products_flops(batch, h, max(lq, lk), d, d)
        return 2 * batch * h * d * d * (lk + lq)

    # decoding -------------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """CS: {A, Z, m} of the context (A = sum exp(k - m) v^T, Z = sum exp(k - m), m the running
        per-feature maximum, -inf before any real key). CC: {S}, the normalised summary of the memory."""
        if not self.causal:
            raise ValueError(f"incremental decoding applies to CS and CC, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        heads = self.num_heads
        k, v = repeat_kv(k, heads).to(dtype), repeat_kv(v, heads).to(dtype)
        if self.cross:
            e = shifted_exp(k, key_padding_mask)
            return {"S": (e / nonzero(e.sum(dim=-2, keepdim=True))).transpose(-1, -2) @ v}
        logits = k
        if key_padding_mask is not None:
            logits = k.masked_fill(key_padding_mask.bool()[:, None, :, None], float("-inf"))
        if k.shape[-2]:
            m = logits.amax(dim=-2)
        else:
            m = k.new_full((k.shape[0], heads, k.shape[-1]), float("-inf"))
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(logits - safe.unsqueeze(-2))
        return {"A": e.transpose(-1, -2) @ v, "Z": e.sum(dim=-2), "m": m}

    def decode_step(self, state, q, k=None, v=None):
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        q = q.to(dtype)
        check_step_inputs(self, k, v)
        if self.cross:
            return (F.silu(q) @ state["S"]).to(out_dtype), state
        k, v = repeat_kv(k, self.num_heads).to(dtype)[:, :, 0], repeat_kv(v, self.num_heads).to(dtype)
        m = torch.maximum(state["m"], k)
        decay = torch.exp(state["m"] - m)  # 0 where the old maximum was -inf
        e = torch.exp(k - m)
        a = decay.unsqueeze(-1) * state["A"] + e.unsqueeze(-1) * v  # (B, H, D, Dv)
        z = decay * state["Z"] + e
        out = (F.silu(q) / z.unsqueeze(-2)) @ a
        return out.to(out_dtype), {"A": a, "Z": z, "m": m}
