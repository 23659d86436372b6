"""RALA: rank-augmented linear attention — the KV buffer's terms re-weighted by a softmax against a global
(mean) query, and the output modulated element-wise by a projection of the query token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.feature_map import seeded_normal
from cab.attention.engine.prepare import compute_dtype, key_weights, nonzero, softmax_scale
from cab.patterns import attention_mask
from cab.registry import register_attention

_CAUSAL = ("the global query is the mean of every query, so each row depends on later queries; a prefix-mean "
           "variant re-weights all earlier keys with a different softmax per row, which has no linear-time "
           "prefix form (it is O(L^2))")


def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


@register_attention(
    "rala", patterns=("NS", "NC"), family="linear", exact=False, mechanism="M17",
    citation="Fan et al., Breaking the Low-Rank Dilemma of Linear Attention, CVPR 2025",
    unsupported={"CS": _CAUSAL, "CC": _CAUSAL},
)
class RALAAttention(Attention):
    """Rank-augmented linear attention (paper Sec. 4, Eq. 8-10; [BG] checked against the authors' RAVLT
    layer): with phi = ELU + 1 and the global query q_bar = mean_i phi(q_i),

        alpha_j = softmax_j(q_bar . phi(k_j) / sqrt(d))  (over the real keys),
        O_i = [phi(q_i) sum_j alpha_j phi(k_j) v_j^T / phi(q_i) . sum_j alpha_j phi(k_j)] * (q_i W_g),

    the context-aware re-weighting of the KV buffer raising its rank, and the element-wise output gate
    raising the output's. The paper's gate is a projection of the layer input x_i; cab's operator only sees
    q, k, v, so [EJ] the gate is a learned per-head (d, d_v) projection of the query token q_i (seeded,
    `seed`; `gate=False` drops it). The paper's RoPE on the numerator and its LePE convolution belong to
    the surrounding layer and are not part of this operator. The N factors of the paper's k * alpha * N
    and kv / N cancel in the ratio.

    NS and NC (Lq != Lk is fine: the global query pools the queries, the re-weighting the keys). In NS the
    key padding mask marks padded positions of the one sequence, so their queries are left out of the
    global query too (NC pools every query: its queries carry no mask). The causal patterns are unsupported
    (see the reason). Padded keys get no weight; when every key of a batch row is padded its rows output 0.
    O(L d d_v) time and memory.
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, gate: bool = True, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        self.use_gate, self.seed = bool(gate), seed
        self.gate = (nn.Parameter(seeded_normal((num_heads, head_dim, head_dim), seed, head_dim ** -0.5))
                     if gate else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.use_gate}, seed={self.seed}"

    def _query_mean(self, phi_q: torch.Tensor, key_padding_mask) -> torch.Tensor:
        """q_bar (B, H, 1, d): the mean of phi(q) over the queries; in NS the padding mask marks padded
        positions of the one sequence, queries included, and those are left out."""
        if self.cross or key_padding_mask is None or key_padding_mask.shape[-1] != phi_q.shape[-2]:
            return phi_q.mean(dim=-2, keepdim=True)
        real = key_weights(key_padding_mask, phi_q.shape[0], phi_q.shape[-2], phi_q.device, phi_q.dtype)
        return (phi_q * real).sum(dim=-2, keepdim=True) / nonzero(real.sum(dim=-2, keepdim=True))

    def _key_weights(self, phi_q: torch.Tensor, phi_k: torch.Tensor, key_padding_mask) -> torch.Tensor:
        """alpha (B, H, Lk, 1): softmax over the real keys of q_bar . phi(k) / sqrt(d); 0 for padded keys."""
        q_bar = self._query_mean(phi_q, key_padding_mask)  # (B, H, 1, d)
        logits = (q_bar @ phi_k.transpose(-1, -2)) * softmax_scale(phi_q.shape[-1])  # (B, H, 1, Lk)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask.bool()[:, None, None, :], float("-inf"))
        alpha = torch.softmax(logits, dim=-1)
        alpha = torch.nan_to_num(alpha, nan=0.0)  # a batch row with every key padded
        return alpha.transpose(-1, -2)

    def _gate(self, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out if self.gate is None else out * (q @ self.gate.to(q.dtype))

    def forward(self, q, k, v, key_padding_mask=None):
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        q, k, v = q.to(dtype), repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype)
        phi_q, phi_k = _phi(q), _phi(k)
        weighted = phi_k * self._key_weights(phi_q, phi_k, key_padding_mask)
        kv = weighted.transpose(-1, -2) @ v  # (B, H, d, dv)
        den = phi_q @ weighted.sum(dim=-2).unsqueeze(-1)  # (B, H, Lq, 1)
        out = (phi_q @ kv) / nonzero(den)
        return self._gate(q, out).to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk matrix phi(q_i).phi(k_j) alpha_j, alpha written as exp / sum over the visible
        keys, masked, row-normalised, times V, times the gate."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        phi_q, phi_k = _phi(q), _phi(k)
        visible = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        if self.cross or key_padding_mask is None or key_padding_mask.shape[-1] != q.shape[-2]:
            q_bar = phi_q.sum(dim=-2, keepdim=True) / q.shape[-2]
        else:  # NS: the padded positions' queries are padding too
            real = (~key_padding_mask.bool()).to(q.dtype)[:, None, :, None]
            q_bar = (phi_q * real).sum(dim=-2, keepdim=True) / real.sum(dim=-2, keepdim=True).clamp(min=1)
        raw = torch.exp((q_bar * phi_k).sum(dim=-1) / q.shape[-1] ** 0.5).unsqueeze(-2) * visible  # (B, H, 1|Lq, Lk)
        total = raw.sum(-1, keepdim=True)
        alpha = raw / torch.where(total > 0, total, torch.ones_like(raw[..., :1]))
        weights = (phi_q @ phi_k.transpose(-1, -2)) * alpha * visible
        den = weights.sum(dim=-1, keepdim=True)
        out = (weights @ v) / nonzero(den)
        return self._gate(q, out)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        h, d = self.num_heads, self.head_dim
        flops = 2 * batch * h * (lk * d + lk * d * d + lq * d * d + lq * d)
        return flops + (2 * batch * h * lq * d * d if self.gate is not None else 0)
