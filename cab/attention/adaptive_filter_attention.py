"""Adaptive filter attention (AFA), the simplified (isotropic) variant: tokens are noisy observations of a
linear SDE with isotropic decay and rotations; keys and values are transported to the query's time, and
the weights are a robust (Student-t) likelihood of the query-key residual under the propagated
precision. O(L^2 d) time like softmax attention; query blocks (no L x L tensor), per-row reference, and
KV-cache decoding for causal self attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import repeat_kv
from cab.attention.engine.kv_cache import KVCacheAttention
from cab.attention.engine.masks import query_offset
from cab.attention.engine.prepare import compute_dtype, grouped_compute
from cab.attention.engine.rotary import rotate
from cab.attention.engine.scores import blocked_inputs, blocked_rows, cached_block, reference_rows
from cab.registry import register_attention

_CROSS = ("the dynamics transport keys to the query's time along one time axis; two different sequences "
          "share no time axis")


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


@register_attention(
    "adaptive_filter_attention", patterns=("NS", "CS"), family="softmax-variant", exact=False, mechanism="M60",
    citation="Racioppo, Attention as an Adaptive Filter, arXiv 2509.04154 (2025) (later versions: Robust "
    "Filter Attention)",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class AdaptiveFilterAttention(KVCacheAttention):
    """Isotropic AFA. Per head: decay mu > 0, process noise sigma^2 > 0, measurement noise eta^2 > 0 and
    rotation frequencies omega (D/2 of them); token j at time t_j, query i at t_i, tau = t_i - t_j:

        transport  Phi(tau) x = exp(-mu |tau|) R(omega tau) x          (isotropic decay, pairwise rotations)
        variance   V(tau) = sigma^2 (1 - exp(-2 mu |tau|)) / (2 mu) + eta^2 (1 + exp(-2 mu |tau|))
        residual   r_ij = q_i - Phi(tau) k_j,    P_ij = 1 / V(tau)
        logit      l_ij = (d/2) log P_ij - ((nu + d)/2) log(1 + P_ij |r_ij|^2 / nu)   (Student-t, nu = `dof`)
        output     o_i = sum_j softmax_j(l_ij) Phi(tau) v_j

    The keys are propagated to the query's time under the dynamics, each is weighted by how consistent it
    is with the query under the propagated precision (a robust, heavy-tailed likelihood: outliers are
    down-weighted, and far tokens carry less precision), and the values are transported the same way. As
    nu -> infinity the logit becomes log P - P |r|^2 / 2, and with mu = sigma = 0 it is
    (q_i . R k_j) / (2 eta^2) up to per-row and per-key norms: rotary dot-product attention, the limit the
    paper states. Simplification: because the rotation is orthogonal and the decay a scalar,
    q . R(omega (t_i - t_j)) k = R(-omega t_i) q . R(-omega t_j) k, so one matmul per block gives every
    residual norm, and the transported value sum is R(omega t_i) sum_j w_ij exp(-mu |tau|) R(-omega t_j) v_j:
    O(L^2 d), the "same computational and memory complexity as standard attention".

    [BG/EJ] From the abstract and summaries of arXiv 2509.04154 (v1 "Attention as an Adaptive Filter",
    later "Robust Filter Attention"): isotropic decay and noise, rotations, propagated precision, robust
    residual reweighting. The exact variance expression, the Student-t form of the robust weight and the
    symmetric |tau| used by the noncausal pattern (a smoother; the paper's backward propagation would grow
    like exp(mu |tau|)) are our choices. Positions: t = index; CS bottom-right (query i at i + Lk - Lq).
    Init: mu = 0.01, sigma^2 = 0.01, eta^2 = sqrt(d)/2 (so P = 1/sqrt(d) at tau = 0: the 1/sqrt(d) score
    scale in the Gaussian limit), omega = RoPE's 10000^(-2m/d); all learned (positivity by softplus).
    NC/CC are unsupported. Differentiable everywhere (|tau| only enters through fixed positions).
    """

    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, dof: float = 4.0, decay: float = 0.01,
                 process_noise: float = 0.01, measurement_noise: "float | None" = None, rope_base: float = 10000.0,
                 chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim)
        if dof <= 0 or decay <= 0 or process_noise <= 0 or chunk_size < 1:
            raise ValueError("dof, decay, process_noise and chunk_size must be positive")
        eta2 = math.sqrt(head_dim) / 2 if measurement_noise is None else float(measurement_noise)
        self.dof, self.chunk_size = float(dof), chunk_size
        self.raw_decay = nn.Parameter(torch.full((num_heads,), _inverse_softplus(decay)))
        self.raw_process = nn.Parameter(torch.full((num_heads,), _inverse_softplus(process_noise)))
        self.raw_measurement = nn.Parameter(torch.full((num_heads,), _inverse_softplus(eta2)))
        half = head_dim // 2
        freqs = rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / max(head_dim, 1))
        self.frequencies = nn.Parameter(freqs.repeat(num_heads, 1).to(torch.get_default_dtype()))

    def _params(self, dtype):
        mu = F.softplus(self.raw_decay.to(dtype))[:, None, None]
        sigma2 = F.softplus(self.raw_process.to(dtype))[:, None, None]
        eta2 = F.softplus(self.raw_measurement.to(dtype))[:, None, None]
        return mu, sigma2, eta2, self.frequencies.to(dtype)

    def _block(self, q, k, v, visible, tq, tk):
        """Output of query rows at times tq (R,) over keys at times tk (K,); visible (B|1, 1, R, K)."""
        mu, sigma2, eta2, omega = self._params(q.dtype)
        d = q.shape[-1]
        qr = rotate(q, -tq[:, None] * omega[:, None, :])  # (B, H, R, D)
        kr = rotate(k, -tk[:, None] * omega[:, None, :])
        vr = rotate(v, -tk[:, None] * omega[:, None, :])
        gap = (tq[:, None] - tk[None, :]).abs()  # (R, K)
        decay = torch.exp(-mu * gap)  # (H, R, K)
        decay2 = decay.square()
        variance = sigma2 * (-torch.expm1(-2 * mu * gap)) / (2 * mu) + eta2 * (1 + decay2)
        precision = 1.0 / variance
        residual = (q.square().sum(-1, keepdim=True) + decay2 * k.square().sum(-1).unsqueeze(-2)
                    - 2 * decay * (qr @ kr.transpose(-1, -2)))
        residual = residual.clamp_min(0)  # |r|^2 >= 0 (rounding)
        logits = 0.5 * d * torch.log(precision) - 0.5 * (self.dof + d) * torch.log1p(precision * residual / self.dof)
        opened = visible | ~visible.any(dim=-1, keepdim=True)
        weights = torch.softmax(logits.masked_fill(~opened, float("-inf")), dim=-1)
        return rotate((weights * decay) @ vr, tq[:, None] * omega[:, None, :])

    def _run(self, q, k, v, key_ok, offset):
        def times(qs, qe, kend):  # the query rows' and keys' positions, for the decay and the rotations
            return (torch.arange(qs, qe, device=q.device, dtype=q.dtype) + offset,
                    torch.arange(kend, device=q.device, dtype=q.dtype))

        return blocked_rows(self._block, q, k, v, self.pattern, key_ok, offset, self.chunk_size,
                            torch.is_grad_enabled(), times)

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_ok, offset, out_dtype = blocked_inputs(self.pattern, q, k, v, key_padding_mask)
        return self._run(q, k, v, key_ok, offset).to(out_dtype)

    def attend_cached(self, q, keys, values, real):
        """The new token is the last cached one: the query sits at time n - 1 over keys 0..n-1."""
        _, keys, values, _ = grouped_compute(q, keys, values)
        n, dtype = keys.shape[-2], keys.dtype
        tq = torch.tensor([n - 1], device=q.device, dtype=dtype)
        tk = torch.arange(n, device=q.device, dtype=dtype)
        return cached_block(self._block, q, keys, values, real, tq, tk)

    def peak_memory_estimate(self, batch, lq, lk, kv_heads, mode, dtype):
        """(B, H, C, Lk) blocks in the compute dtype — decay, variance, precision, residual, logits, weights
        and masks, about ten per block — plus rotated q, k, v and the output; the backward recomputes one
        checkpointed block at a time. Calibrated on cab's CPU memory probe (L = 512, CS: about 10 blocks in
        fwd, 21 in fwdbwd), with margin."""
        item = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        block = batch * self.num_heads * min(lq, self.chunk_size) * lk * item
        rows = 4 * batch * self.num_heads * max(lq, lk) * self.head_dim * item
        return int((28 if mode in ("bwd", "fwdbwd") else 14) * block + 6 * rows)

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row with the transport applied to each key and value directly (rotation by omega (t_i -
        t_j), decay exp(-mu |t_i - t_j|)), the residual vector formed explicitly, the Student-t log-density
        as the logit, softmax over the visible keys."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        mu, sigma2, eta2, omega = (x.squeeze(-1).squeeze(-1) if x.dim() == 3 else x for x in self._params(q.dtype))
        d = q.shape[-1]
        offset = query_offset(self.pattern, q.shape[-2], k.shape[-2])

        def row(b, i, idx):
            tau = (i + offset - idx).to(q.dtype)  # (n,)
            angles = tau[None, :, None] * omega[:, None, :]  # (H, n, D/2)
            decay = torch.exp(-mu[:, None] * tau.abs()[None, :])  # (H, n)
            moved_k = decay[..., None] * rotate(k[b][:, idx], angles)
            moved_v = decay[..., None] * rotate(v[b][:, idx], angles)
            r2 = (q[b, :, i][:, None, :] - moved_k).square().sum(-1)  # (H, n)
            var = (sigma2[:, None] * (1 - torch.exp(-2 * mu[:, None] * tau.abs())) / (2 * mu[:, None])
                   + eta2[:, None] * (1 + torch.exp(-2 * mu[:, None] * tau.abs())))
            logit = -0.5 * d * torch.log(var) - 0.5 * (self.dof + d) * torch.log(1 + r2 / (var * self.dof))
            weights = torch.softmax(logit, dim=-1)
            return (weights[:, None, :] @ moved_v).squeeze(1)

        return reference_rows(self.pattern, q, k.shape[-2], v.shape[-1], key_padding_mask, row)
