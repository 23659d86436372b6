"""LinFusion's generalized linear attention (M24): ELU+1 linear attention whose query and key feature maps
carry a learned non-linear residual projection, normalised by the mean over the keys ("attention
normalization") so that outputs keep their scale at any resolution / length."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prepare import align_bottom_right, compute_dtype
from cab.attention.scattered_linear import segmented_linear_parts
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention


def _uniform(shape: "tuple[int, ...]", bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


class ResidualProjection(nn.Module):
    """x + W2 LeakyReLU(LayerNorm(W1 x + b1)) + b2 on the last dimension (LinFusion's `to_q_` / `to_k_`
    non-linear projection, Linear -> LayerNorm -> LeakyReLU -> Linear), initialised like torch.nn.Linear
    (uniform +-1/sqrt(fan_in)) from `generator`."""

    def __init__(self, dim: int, mid: int, generator: torch.Generator):
        super().__init__()
        dtype = torch.get_default_dtype()
        self.w1 = nn.Parameter(_uniform((mid, dim), dim ** -0.5, generator).to(dtype))
        self.b1 = nn.Parameter(_uniform((mid,), dim ** -0.5, generator).to(dtype))
        self.norm = nn.LayerNorm(mid)
        self.w2 = nn.Parameter(_uniform((dim, mid), mid ** -0.5, generator).to(dtype))
        self.b2 = nn.Parameter(_uniform((dim,), mid ** -0.5, generator).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.w1.to(x.dtype), self.b1.to(x.dtype))
        norm = self.norm  # its parameters in the compute dtype (a bfloat16 module computes in float32)
        hidden = F.leaky_relu(F.layer_norm(hidden, norm.normalized_shape, norm.weight.to(x.dtype),
                                           norm.bias.to(x.dtype), norm.eps))
        return x + F.linear(hidden, self.w2.to(x.dtype), self.b2.to(x.dtype))


@dataclass(frozen=True)
class NormalizedLinearState:
    """Decoding state: S = sum phi(k) v^T (B, H, m, Dv), z = sum phi(k) (B, H, m) and the number of real
    keys n (B,) of the prefix (CS) or the memory (CC)."""

    kv: torch.Tensor
    z: torch.Tensor
    n: torch.Tensor


@register_attention(
    "linfusion", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M24",
    citation="Liu et al., LinFusion: 1 GPU, 1 Minute, 16K Image, arXiv 2409.02097 (2024)",
)
class LinFusionAttention(Attention):
    """Generalized linear attention of LinFusion (Liu et al. 2024, Sec. 4: the non-causal, normalised
    linear attention derived from Mamba2 with a non-linear kernel), as released (linfusion/attention.py):

        phi_q(x) = ELU(x + f_q(x)) + 1,  phi_k(x) = ELU(x + f_k(x)) + 1,
        out_i = phi_q(q_i)^T (1/n sum_j phi_k(k_j) v_j^T) / (phi_q(q_i)^T (1/n sum_j phi_k(k_j)) + eps),

    n the number of keys the query sees and eps = 1e-4 (the code's z + 1e-4): the "attention
    normalization" divides both sums by n, so eps acts as eps * n on the plain normaliser. f_q and f_k are
    the learned residual projections (Linear(d, mid) -> LayerNorm -> LeakyReLU -> Linear(mid, d),
    mid = `projection_mid_dim`, default d as in the code); LinFusion applies them to the hidden states
    before W_q / W_k, cab (which receives projected heads) applies them to each head's q and k, the
    parameters shared by the heads and initialised from `seed`. They are the "generalized" part (a
    data-dependent kernel in place of Mamba2's decay); distillation trains them, here they are parameters.

    Patterns: the paper is noncausal (NS, and NC for the cross-attention form); CS and CC are prefix
    variants (CS: query t uses the keys j <= t + Lk - Lq, n its count of real keys, computed in chunks
    with carried states; CC: the whole memory, nothing from other queries). Padded keys are left out of
    the sums and of n; a query with no visible key outputs 0. Differentiable everywhere except LeakyReLU
    at 0. Decoding keeps (S, z, n): O(m Dv) per head.
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, projection_mid_dim: "int | None" = None, eps: float = 1e-4,
                 chunk_size: int = 64, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        mid = head_dim if projection_mid_dim is None else projection_mid_dim
        if mid < 1 or chunk_size < 1 or eps < 0:
            raise ValueError("projection_mid_dim and chunk_size must be positive, eps >= 0")
        self.projection_mid_dim, self.eps, self.chunk_size, self.seed = mid, eps, chunk_size, seed
        generator = torch.Generator().manual_seed(seed)
        self.to_q_ = ResidualProjection(head_dim, mid, generator)
        self.to_k_ = ResidualProjection(head_dim, mid, generator)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, projection_mid_dim={self.projection_mid_dim}, eps={self.eps}, "
                f"chunk_size={self.chunk_size}, seed={self.seed}")

    def feature_maps(self, q, k, key_padding_mask):
        """(phi_q(q), phi_k(k)) with padded keys zero; k keeps its own (key/value) heads."""
        phi_q = F.elu(self.to_q_(q)) + 1.0
        phi_k = F.elu(self.to_k_(k)) + 1.0
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        return phi_q, phi_k

    def _finish(self, num, den, n):
        """num / (den + eps n), 0 where the query sees no key (n == 0)."""
        den = den + self.eps * n
        return torch.where(n > 0, num / torch.where(n > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    def forward(self, q, k, v, key_padding_mask=None):
        out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        hq, lk = q.shape[1], k.shape[-2]
        drop = 0
        if self.pattern is Pattern.CS:
            k, v = repeat_kv(k, hq), repeat_kv(v, hq)
            q, k, v, key_padding_mask, drop = align_bottom_right(q, k, v, key_padding_mask)
            lk = k.shape[-2]
        real = torch.ones(q.shape[0], lk, dtype=dtype, device=q.device) if key_padding_mask is None \
            else (~key_padding_mask.bool()).to(device=q.device, dtype=dtype)
        phi_q, phi_k = self.feature_maps(q, k, key_padding_mask)
        phi_k, v = repeat_kv(phi_k, hq), repeat_kv(v, hq)
        if self.pattern is Pattern.CS:
            runs = torch.zeros(q.shape[0], q.shape[-2], dtype=torch.long, device=q.device)
            num, den = segmented_linear_parts(phi_q, phi_k, v, runs, True, self.chunk_size)
            n = real.cumsum(dim=-1)[:, None, :, None]
        else:
            num = phi_q @ (phi_k.transpose(-1, -2) @ v)
            den = phi_q @ phi_k.sum(dim=-2).unsqueeze(-1)
            n = real.sum(dim=-1)[:, None, None, None]
        return self._finish(num, den, n)[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk kernel matrix phi_q(Q) phi_k(K)^T masked by the pattern and padding; each
        row's sums divided by its visible-key count, then normalised with eps."""
        visible = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device).to(q.dtype)
        phi_q, phi_k = F.elu(self.to_q_(q)) + 1.0, F.elu(self.to_k_(k)) + 1.0
        phi_k, v = repeat_kv(phi_k, q.shape[1]), repeat_kv(v, q.shape[1])
        weights = (phi_q @ phi_k.transpose(-1, -2)) * visible
        n = visible.sum(dim=-1, keepdim=True)
        safe = torch.where(n > 0, n, torch.ones_like(n))
        out = (weights @ v / safe) / (weights.sum(dim=-1, keepdim=True) / safe + self.eps)
        return out * (n > 0)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """The residual projections (two matmuls each for q and k) and the linear-attention products
        (noncausal: global sums; CS: the chunked form of scattered_linear on the aligned length)."""
        h, d, mid = self.num_heads, self.head_dim, self.projection_mid_dim
        if self.pattern is Pattern.CS:
            length = max(lq, lk)
            c = self.chunk_size
            padded = -(-length // c) * c
            project = 2 * batch * h * 2 * length * 2 * d * mid
            return project + 2 * batch * h * padded * (c * d + c * d + 2 * d * d + d)
        project = 2 * batch * (h * lq + kv_heads * lk) * 2 * d * mid
        return project + 2 * batch * h * (lk * d * d + lq * d * d + lq * d)

    # decoding -----------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        if not self.causal:
            raise ValueError(f"incremental decoding applies to CS and CC, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = k.to(dtype), v.to(dtype)
        _, phi_k = self.feature_maps(k, k, key_padding_mask)
        phi_k, v = repeat_kv(phi_k, self.num_heads), repeat_kv(v, self.num_heads)
        n = torch.full((k.shape[0],), float(k.shape[-2]), dtype=dtype, device=k.device) if key_padding_mask is None \
            else (~key_padding_mask.bool()).sum(dim=-1).to(device=k.device, dtype=dtype)
        return NormalizedLinearState(phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=-2), n)

    def decode_step(self, state, q, k=None, v=None):
        dtype = compute_dtype(q.dtype)
        check_step_inputs(self, k, v)
        if self.cross:
            new = state
        else:
            phi_k = repeat_kv(F.elu(self.to_k_(k.to(dtype))) + 1.0, self.num_heads)
            v = repeat_kv(v.to(dtype), self.num_heads)
            new = NormalizedLinearState(state.kv + phi_k.transpose(-1, -2) @ v, state.z + phi_k[:, :, 0],
                                        state.n + 1)
        phi_q = F.elu(self.to_q_(q.to(dtype))) + 1.0
        out = self._finish(phi_q @ new.kv, phi_q @ new.z.unsqueeze(-1), new.n[:, None, None, None])
        return out.to(q.dtype), new
