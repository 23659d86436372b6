"""MirrorLA: linear attention whose feature map reflects q and k with learnable Householder reflections
(block-wise within each head, then across heads) before the ReLU, instead of truncating them as they are."""

from __future__ import annotations

import torch
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.feature_map import seeded_normal
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prefix_sums import pattern_linear_attention
from cab.attention.engine.prepare import compute_dtype, key_weights, nonzero, prepare
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


@register_attention(
    "mirrorla", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M15",
    citation="Meng et al., MirrorLA: Reflecting Feature Map for Vision Linear Attention, arXiv 2602.04346 (2026)",
)
class MirrorLAAttention(Attention):
    """MirrorLA ([A] abstract; [EJ] the operator below): phi(x) = ReLU(R_cross R_block x), normalised linear
    attention phi(q_i) sum_j phi(k_j) v_j^T / phi(q_i) sum_j phi(k_j).

    - Block-wise isometries: each head's d features are split into blocks of `block_size` (the last block
      takes the remainder) and every block is reflected by its own learnable Householder reflection
      I - 2 u u^T / |u|^2 (orthogonal, so the block geometry is kept while it is reoriented towards the
      non-negative orthant before the ReLU, instead of ReLU's passive truncation).
    - Cross-head reflection: one learnable Householder reflection of the concatenation of all heads'
      features (H d), mixing the heads' subspaces (the abstract's "global covariance mixing"); it uses only
      the same token's features, so causality is untouched.
    - The abstract's "variance-aware modulation" is not implemented: its formulation is not in the seed
      abstract and the paper's equations were not available to cab, so it is left out rather than guessed.

    Reflection vectors are learned, initialised from `seed`. Keys are reflected after GQA expansion (the
    cross-head reflection needs every query head's partner). Patterns: all four — the feature map is
    per token, so CS uses chunked prefix sums (bottom-right aligned when Lq != Lk) and CC reads the global
    key summary. Padded keys get zero features; a row whose features are all zero or that sees no key
    outputs 0. Decoding keeps (sum phi(k) v^T, sum phi(k)), O(d d_v) per head.
    """

    mixes_heads = True  # the cross-head Householder reflections mix the heads' features

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, block_size: int = 16, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size, self.seed = block_size, seed
        self.blocks = [(s, min(head_dim, s + block_size)) for s in range(0, head_dim, block_size)]
        self.block_vectors = nn.Parameter(seeded_normal((num_heads, head_dim), seed, 1.0, salt=1))
        self.cross_vector = nn.Parameter(seeded_normal((num_heads, head_dim), seed, 1.0, salt=2))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, seed={self.seed}"

    def reflect(self, x: torch.Tensor) -> torch.Tensor:
        """R_cross R_block x for x (B, H, L, d), H = num_heads."""
        u = self.block_vectors.to(x.dtype)
        parts = []
        for start, stop in self.blocks:
            xb, ub = x[..., start:stop], _unit(u[:, start:stop])[None, :, None, :]
            parts.append(xb - 2.0 * (xb * ub).sum(dim=-1, keepdim=True) * ub)
        x = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        c = self.cross_vector.to(x.dtype)
        c = (c / torch.linalg.vector_norm(c))[None, :, None, :]
        return x - 2.0 * (x * c).sum(dim=(1, 3), keepdim=True) * c

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.reflect(x))

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        dtype = q.dtype
        phi_q = self.features(q)
        phi_k = self.features(k) * key_weights(key_padding_mask, k.shape[0], k.shape[-2], k.device, dtype)
        out = pattern_linear_attention(self.pattern is Pattern.CS, phi_q, phi_k, v)
        return out[:, :, drop:].to(out_dtype)

    def rotation(self, dtype: "torch.dtype | None" = None) -> torch.Tensor:
        """The explicit (H d, H d) orthogonal matrix R_cross R_block acting on the concatenated heads."""
        h, d = self.num_heads, self.head_dim
        u = self.block_vectors.to(dtype or self.block_vectors.dtype)
        block = torch.zeros(h * d, h * d, dtype=u.dtype, device=u.device)
        for head in range(h):
            for start, stop in self.blocks:
                ub = _unit(u[head, start:stop])
                lo = head * d
                block[lo + start:lo + stop, lo + start:lo + stop] = (
                    torch.eye(stop - start, dtype=u.dtype, device=u.device) - 2.0 * torch.outer(ub, ub))
        c = _unit(self.cross_vector.to(u.dtype).reshape(-1))
        cross = torch.eye(h * d, dtype=u.dtype, device=u.device) - 2.0 * torch.outer(c, c)
        return cross @ block

    def reference(self, q, k, v, key_padding_mask=None):
        """Features through the explicit (H d x H d) rotation matrix; the explicit Lq x Lk kernel matrix
        phi(Q) phi(K)^T masked by the pattern and padding, row-normalised, times V."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        rotation = self.rotation(q.dtype)
        b, h, _, d = q.shape

        def phi(x):
            flat = x.transpose(1, 2).reshape(b, x.shape[-2], h * d) @ rotation.T
            return torch.relu(flat.reshape(b, x.shape[-2], h, d).transpose(1, 2))

        kernel = phi(q) @ phi(k).transpose(-1, -2)
        kernel = kernel * attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        den = kernel.sum(dim=-1, keepdim=True)
        return (kernel @ v) / nonzero(den)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        h, d = self.num_heads, self.head_dim
        if self.pattern is Pattern.CS:
            length = -(-max(lq, lk) // 64) * 64
            # causal_linear_attention: chunk states, numerator (prefix + block), normaliser matvec
            return 2 * batch * h * length * (d * d + 64 * d + d * d + 64 * d + d)
        return 2 * batch * h * (lk * d * d + lq * d + lq * d * d)

    # decoding -------------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """{S = sum phi(k) v^T (B, H, d, dv), z = sum phi(k) (B, H, d)} of the context (CS) or memory (CC)."""
        if not self.causal:
            raise ValueError(f"incremental decoding applies to CS and CC, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        phi_k = self.features(k) * key_weights(key_padding_mask, k.shape[0], k.shape[-2], k.device, dtype)
        return {"S": phi_k.transpose(-1, -2) @ v, "z": phi_k.sum(dim=-2)}

    def decode_step(self, state, q, k=None, v=None):
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        q = q.to(dtype)
        check_step_inputs(self, k, v)
        if not self.cross:
            k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
            phi_k = self.features(k)
            state = {"S": state["S"] + phi_k.transpose(-1, -2) @ v, "z": state["z"] + phi_k[:, :, 0]}
        phi_q = self.features(q)
        num = phi_q @ state["S"]
        den = phi_q @ state["z"].unsqueeze(-1)
        out = num / nonzero(den)
        return out.to(out_dtype), state
