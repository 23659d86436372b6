"""Feature maps of linear attention and the attention they define: `FeatureMapAttention`, the base of
normalised feature-map attentions (key summary for NS/NC/CC, chunked tiled product for CS, dense reference,
decode state (phi(K)^T V, phi(K)^T 1)), the random features some maps draw (seeded Gaussians, FAVOR+'s
block-orthogonal directions) and the ELU+1 map."""

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
from cab.attention.engine.prepare import compute_dtype, nonzero, prepare, zero_padded
from cab.patterns import Pattern, attention_mask


def seeded_normal(shape: "tuple[int, ...]", seed: int, std: float = 1.0, salt: int = 0) -> torch.Tensor:
    """A deterministic N(0, std^2) tensor in the default dtype from a generator seeded by (seed, salt)."""
    generator = torch.Generator().manual_seed(int(seed) * 1000003 + salt)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * std).to(torch.get_default_dtype())


def orthogonal_gaussian_features(num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(num_features, dim) block-orthogonal Gaussian directions with chi-distributed row norms (FAVOR+,
    Choromanski et al. 2021 Sec. 2.4): each block of `dim` rows is the Q factor of a Gaussian matrix,
    each row rescaled by the norm of an independent Gaussian vector so its marginal stays N(0, I)."""
    blocks = []
    for start in range(0, num_features, dim):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        ortho, _ = torch.linalg.qr(gaussian)
        blocks.append(ortho.T[: min(dim, num_features - start)])
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return norms.unsqueeze(1) * torch.cat(blocks)


def projections(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """w_f^T x' for x' = x / d^(1/4) (the scaling folded into the (H, m, d) directions): (B, H, L, m)."""
    return x @ (omega * x.shape[-1] ** -0.25).transpose(-1, -2)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (paper Sec. 3.2, Eq. 7): positive, so every normaliser of real keys is > 0."""
    return F.elu(x) + 1.0


def shifted_exp(logits: torch.Tensor, key_padding_mask: "torch.Tensor | None",
                dim: "int | tuple[int, ...]" = -2) -> torch.Tensor:
    """exp(logits - c), logits (B, H, L, r), with c the detached maximum over the real positions along `dim` (the
    sequence, or the sequence and features); c cancels in every normalised quantity. Padded positions get 0."""
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask.bool()[:, None, :, None], float("-inf"))
    shift = logits.detach().amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return torch.exp(logits - shift)


def dense_visible(attn: Attention, lq: int, lk: int, key_padding_mask: "torch.Tensor | None",
                  device: "torch.device | str | None", dtype: torch.dtype) -> torch.Tensor:
    """(B or 1, 1, Lq, Lk) float visibility of the pattern and padding (CS bottom-right aligned)."""
    return attention_mask(attn.pattern, lq, lk, key_padding_mask, device=device).to(dtype)


class FeatureMapAttention(Attention):
    """Normalised feature-map attention out_i = sum_j phi_q(q_i).phi_k(k_j) v_j / sum_j phi_q(q_i).phi_k(k_j)
    over the visible keys, for every pattern: noncausal and causal cross use the whole key summary
    (phi_k^T V, phi_k^T 1) — a row depends on no other query, so CC holds —, CS the tiled causal product
    (bottom-right aligned when Lq != Lk). Subclasses define `features(q, k)`; both maps must be per token
    (no statistics across positions) with non-negative values. Padded keys get zero features. Decoding
    keeps the state (phi_k^T V, phi_k^T 1), O(m Dv) per head whatever the length."""

    block_size: int = DEFAULT_BLOCK
    seq_chunk: int = SEQ_CHUNK
    complexity = {"time": 1, "memory": 1}

    def features(self, q: torch.Tensor, k: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """(phi_q(q), phi_k(k)) of shape (B, H, L, m), both non-negative; per token."""
        raise NotImplementedError

    def _key_features(self, k, key_padding_mask):
        """phi_k with padded keys zeroed — their inputs too, so no garbage reaches exp or pow (an inf
        feature times a zero mask would be NaN in the backward)."""
        phi_k = self.features(None, zero_padded(k, key_padding_mask))[1]
        return zero_padded(phi_k, key_padding_mask)

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        pad = (lambda a, b: None if key_padding_mask is None else key_padding_mask[:, a:b])  # noqa: E731
        outs = []
        if self.pattern is Pattern.CS:  # chunks of the sequence, the recurrent state carried across
            state = None
            for a, b in chunks(q.shape[-2], self.seq_chunk):
                phi_q = self.features(q[:, :, a:b], None)[0]
                phi_k = self._key_features(k[:, :, a:b], pad(a, b))
                values = torch.cat([v[:, :, a:b], torch.ones_like(v[:, :, a:b, :1])], dim=-1)
                both, state = decayed_causal_product(phi_q, phi_k, values, None, self.block_size, state=state,
                                                     return_state=True)
                outs.append(both[..., :-1] / nonzero(both[..., -1:]))
        else:  # the key summary over key chunks, then the queries chunk by chunk
            s = z = 0
            for a, b in chunks(k.shape[-2], self.seq_chunk):
                phi_k = self._key_features(k[:, :, a:b], pad(a, b))
                s = s + phi_k.transpose(-1, -2) @ v[:, :, a:b]
                z = z + phi_k.sum(dim=-2)
            for a, b in chunks(q.shape[-2], self.seq_chunk):
                phi_q = self.features(q[:, :, a:b], None)[0]
                outs.append((phi_q @ s) / nonzero(phi_q @ z.unsqueeze(-1)))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk weight matrix phi_q(Q) phi_k(K)^T, masked by the pattern and padding,
        row-normalised, times V."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        phi_q, phi_k = self.features(q, k)
        weights = (phi_q @ phi_k.transpose(-1, -2)) * dense_visible(
            self, q.shape[-2], k.shape[-2], key_padding_mask, q.device, q.dtype)
        den = weights.sum(dim=-1, keepdim=True)
        return (weights @ v) / nonzero(den)

    # decoding: the state is (S = phi_k^T V (B, H, m, Dv), z = phi_k^T 1 (B, H, m)) --------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(device=k.device, dtype=torch.bool)
        phi_k = self._key_features(k, key_padding_mask)
        return phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=-2)

    def decode_step(self, state, q, k=None, v=None):
        s, z = state
        out_dtype = q.dtype
        q = q.to(s.dtype)
        if k is not None:  # CS: the new token enters the state before its query reads it
            k, v = repeat_kv(k, self.num_heads).to(s.dtype), repeat_kv(v, self.num_heads).to(s.dtype)
            phi_k = self.features(None, k)[1]
            s = s + phi_k.transpose(-1, -2) @ v
            z = z + phi_k.sum(dim=-2)
        phi_q = self.features(q, None)[0]
        out = (phi_q @ s) / nonzero(phi_q @ z.unsqueeze(-1))
        return out.to(out_dtype), (s, z)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        m = self.feature_dim()
        d, h = self.head_dim, self.num_heads
        if self.pattern is Pattern.CS:
            return tiled_product_flops(batch, h, max(lq, lk), m, d + 1, self.block_size) + self.feature_flops(
                batch, max(lq, lk), max(lq, lk))
        # linear_attention: K^T V, Q (K^T 1) as a matvec, Q (K^T V)
        return 2 * batch * h * (lk * m * d + lq * m + lq * m * d) + self.feature_flops(batch, lq, lk)

    def feature_dim(self) -> int:
        raise NotImplementedError

    def feature_flops(self, batch: int, lq: int, lk: int) -> int:
        """Matmul FLOPs of the feature maps (0 unless they contain matmuls)."""
        return 0
