"""Perceiver-like query compression (M65, CrossLMM's pooled-token cross-attention): pooled key tokens act
as latent queries over the full key set, and every query then attends the few latents — O((Lq + Lk) r d)."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import grouped_compute, real_keys, set_positive, softmax_scale
from cab.registry import register_attention

_CAUSAL_SELF = ("the latents pool segments of the whole sequence, so a query would read future tokens "
                "through them; the causal version of a bounded latent memory is abc's prefix control")


def latent_slots(real: torch.Tensor, count: int) -> torch.Tensor:
    """(B, Lk) long: the latent each real key pools into (its rank n among the row's N real keys gives
    floor(n * r / N), r = min(count, N): contiguous near-equal groups of real keys), -1 for padding. Ranks
    over real keys, not positions, so padding never moves a key to another latent."""
    rank = real.long().cumsum(dim=-1) - 1
    total = real.long().sum(dim=-1, keepdim=True)
    slots = torch.minimum(total, torch.full_like(total, count))
    slot = torch.div(rank * slots, total.clamp(min=1), rounding_mode="floor")
    return torch.where(real, slot, torch.full_like(slot, -1))


@register_attention(
    "pooled_latent", patterns=("NS", "NC", "CC"), family="low-rank", exact=False, mechanism="M65.perceiver",
    citation="Yan et al., CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention "
    "Mechanisms, arXiv 2505.17020 (2025); Jaegle et al., Perceiver IO, ICLR 2022",
    unsupported={"CS": _CAUSAL_SELF},
)
class PooledLatentAttention(Attention):
    """Two-stage attention through r pooled latents (r = `num_latents`, default 16).

    1. Compression: the real keys are cut into r contiguous near-equal groups (by rank among the real keys,
       so padding does not move them); each latent query z_m is the mean of its group's keys (CrossLMM's
       pooled tokens as queries; r = min(num_latents, number of real keys)). Latent m attends every real key:
       a_m = softmax_j(z_m . k_j / sqrt(d)), latent value u_m = sum_j a_mj v_j.
    2. Read-out: query i attends the latents, keyed by the z_m: out_i = softmax_m(q_i . z_m / sqrt(d)) u_m.

    There are no projections of its own (the backbone's q, k, v projections play them). A row with no
    real key at all outputs 0. The latents depend on keys only, so
    causal cross (CC) holds: row i uses no other query. Positions play no role (NC/CC need no alignment).
    Causal self is unsupported (see the reason). Cost O((Lq + Lk) r d) time, O((Lq + Lk) r) memory.
    """

    complexity = {"time": 1, "memory": 1}

    repr_fields = ("num_latents",)

    def __init__(self, pattern, num_heads, head_dim, num_latents: int = 16):
        super().__init__(pattern, num_heads, head_dim)
        set_positive(self, num_latents=num_latents)

    def _latent_queries(self, k: torch.Tensor, real: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """(z (B, H, r, D), valid (B, 1, r) bool): group means of the real keys."""
        r = min(self.num_latents, k.shape[-2])
        slot = latent_slots(real, r)  # (B, Lk)
        onehot = (slot[:, :, None] == torch.arange(r, device=k.device)).to(k.dtype)  # (B, Lk, r)
        counts = onehot.sum(dim=1)  # (B, r)
        sums = torch.einsum("bhld,blr->bhrd", k, onehot)
        z = sums / counts.clamp(min=1)[:, None, :, None]
        return z, (counts > 0)[:, None, :]

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, out_dtype = grouped_compute(q, k, v)
        b, _, lq, d = q.shape
        lk = k.shape[-2]
        real = real_keys(key_padding_mask, b, lk, q.device)
        if lk == 0:
            return q.new_zeros(*q.shape[:-1], v.shape[-1]).to(out_dtype)
        scale = softmax_scale(d)
        z, valid = self._latent_queries(k, real)
        compress = (z @ k.transpose(-1, -2)) * scale  # (B, H, r, Lk)
        compress = compress.masked_fill(~real[:, None, None, :], float("-inf"))
        compress = torch.softmax(compress.masked_fill(~valid[..., None], 0.0), dim=-1)
        latent_values = compress @ v  # (B, H, r, Dv)
        read = ((q @ z.transpose(-1, -2)) * scale).masked_fill(~valid[:, :, None, :], float("-inf"))
        any_valid = valid.any(dim=-1)  # (B, 1)
        read = torch.softmax(read.masked_fill(~any_valid[:, :, None, None], 0.0), dim=-1)
        out = (read @ latent_values).masked_fill(~any_valid[:, :, None, None], 0.0)
        return out.to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Batch element by element and latent by latent (all heads and queries at once), with explicit segment
        means and softmaxes; the groups are re-derived here as slices of the real keys' index list (group m
        holds the real keys of rank ceil(m N / r) .. ceil((m + 1) N / r) - 1), not taken from `latent_slots`."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        rows = []
        for bi in range(b):
            keys = [j for j in range(lk) if key_padding_mask is None or not bool(key_padding_mask[bi, j])]
            if not keys:
                rows.append(q.new_zeros(h, lq, v.shape[-1]))
                continue
            n = len(keys)
            r = min(self.num_latents, n)
            groups = [keys[-(-m * n // r):-(-(m + 1) * n // r)] for m in range(r)]
            real_k, real_v = k[bi][:, keys], v[bi][:, keys]  # (H, N, D): the real keys and values
            latents, latent_values = [], []
            for members in groups:
                z = k[bi][:, members].mean(dim=1)  # (H, D): the group's key mean
                a = torch.softmax((real_k @ z.unsqueeze(-1)).squeeze(-1) / d ** 0.5, dim=-1)  # (H, N)
                latents.append(z)
                latent_values.append((a.unsqueeze(-2) @ real_v).squeeze(-2))
            z, u = torch.stack(latents, dim=1), torch.stack(latent_values, dim=1)  # (H, r, D), (H, r, Dv)
            rows.append(torch.softmax(q[bi] @ z.transpose(-1, -2) / d ** 0.5, dim=-1) @ u)  # each query reads r
        return torch.stack(rows)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        r = min(self.num_latents, lk)  # the pooling einsum, the compression and the read-out
        return 2 * batch * self.num_heads * r * self.head_dim * (3 * lk + 2 * lq)
