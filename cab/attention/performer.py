"""Performer (FAVOR+): softmax attention estimated with positive orthogonal random features, plus the
feature-map linear-attention kernels (noncausal and chunked causal) that cosFormer reuses."""

from __future__ import annotations

import math

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.feature_map import orthogonal_gaussian_features, projections, shifted_exp
from cab.attention.engine.prefix_sums import pattern_linear_attention
from cab.attention.engine.prepare import nonzero, prepare
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention


@register_attention(
    "performer", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M7",
    citation="Choromanski et al., Rethinking Attention with Performers, ICLR 2021",
)
class PerformerAttention(Attention):
    """FAVOR+: softmax attention estimated as D^-1 phi(Q) (phi(K)^T V) with positive orthogonal random
    features phi(x) = exp(w^T x' - |x'|^2/2) / sqrt(m), x' = x / d^(1/4) (paper Sec. 2.3-2.4, Lemma 1).

    Features: `num_features` (m, CAB's default 16) block-orthogonal Gaussian directions per head, drawn
    once at construction from a torch.Generator seeded with `seed` and kept fixed (a buffer); they are
    never redrawn (CAB redrew non-orthogonal features at every training-mode call) — build with another
    seed to redraw. Same seed, same output.

    Stabilisation: each query row's log-features are shifted by their maximum and all keys' by one
    constant per (batch, head), the maximum over the real keys; both shifts cancel exactly between
    numerator and normaliser because, unlike CAB and performer-pytorch, no epsilon is added to the
    features. CAB also clamps the normaliser at 0.1 (`qkv / normaliser.clamp(min=1e-1)`), which changes
    rows whose normaliser falls below it; cab divides by the normaliser itself (zero only for a row that
    sees no key, whose output is zero). Padded keys get zero features, so they enter neither sums nor the
    shift. Noncausal patterns (NS, NC) and causal cross (CC: every row uses the whole key summary and nothing from other
    queries) use the global key summary; causal self (CS) uses chunked prefix sums (bottom-right aligned
    when Lq != Lk), where CAB silently ran noncausal. Causality is exact in gradients; in values the key
    shift (a maximum over every key) could only show through floating-point underflow of early keys.

    That underflow is real in float32 past scores of about 100: under CS an early row whose visible keys'
    features all fall more than exp's range (~103) below the shift gets a zero normaliser, and its output
    and gradients are 0/0. Measured with conformance's large_logits check (float32, 16 input draws): every
    draw finite up to max |q.k| / sqrt(D) = 80, one failing at 100, four at 120. So the attention declares
    max_logit = 80 and is probed there.
    """

    max_logit = 80.0

    def __init__(self, pattern, num_heads, head_dim, num_features: int = 16, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        omega = torch.stack([orthogonal_gaussian_features(num_features, head_dim, generator) for _ in range(num_heads)])
        self.register_buffer("omega", omega.to(torch.get_default_dtype()))

    def _omega(self, dtype: torch.dtype) -> torch.Tensor:
        return self.omega.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_features={self.num_features}, seed={self.seed}"

    def feature_maps(
        self, q: torch.Tensor, k: torch.Tensor, key_padding_mask: "torch.Tensor | None"
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """Stabilised (phi(q), phi(k)) of shape (B, H, L, m), up to factors that cancel: a query's
        exp(-|q'|^2/2) and its row shift, the keys' common shift, 1/sqrt(m). Padded keys are zero."""
        omega = self._omega(q.dtype)
        log_q = projections(q, omega)
        phi_q = torch.exp(log_q - log_q.amax(dim=-1, keepdim=True).detach())
        half_norm = (0.5 / k.shape[-1] ** 0.5) * torch.linalg.vector_norm(k, dim=-1, keepdim=True) ** 2
        log_k = projections(k, omega) - half_norm
        return phi_q, shifted_exp(log_k, key_padding_mask, dim=(-2, -1))

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        phi_q, phi_k = self.feature_maps(q, k, key_padding_mask)
        out = pattern_linear_attention(self.pattern is Pattern.CS, phi_q, phi_k, v)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk random-feature kernel matrix phi(Q) phi(K)^T (unstabilised, with its
        1/sqrt(m)), masked by the pattern and padding, row-normalised, times V."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        omega = self._omega(q.dtype)
        ratio = 1.0 / math.sqrt(self.num_features)
        scale = q.shape[-1] ** -0.25
        outputs = []
        for h in range(q.shape[1]):
            qh, kh = q[:, h] * scale, k[:, h] * scale
            phi_q = ratio * torch.exp(qh @ omega[h].T - 0.5 * (qh**2).sum(-1, keepdim=True))
            phi_k = ratio * torch.exp(kh @ omega[h].T - 0.5 * (kh**2).sum(-1, keepdim=True))
            kernel = phi_q @ phi_k.transpose(-1, -2)  # (B, Lq, Lk)
            visible = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)[:, 0]
            kernel = kernel * visible
            den = kernel.sum(dim=-1, keepdim=True)
            outputs.append((kernel @ v[:, h]) / nonzero(den))
        return torch.stack(outputs, dim=1)
