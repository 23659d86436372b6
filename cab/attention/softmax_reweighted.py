"""Softmax kept, but re-shaped per query: selective self-attention's query temperature (M54), Cog attention's
signed weights (M55) and affine-scaled attention's input-dependent scale and bias (M56).

All three are dense O(L^2): the forward runs in query blocks (O(C L) memory, see
`cab.attention._score_util`), the reference is a per-row loop, and causal self/cross decode from a KV
cache. The operator receives projected (q, k, v), so where a paper computes a gate from the layer input x
we compute it from the row's query q_i (the only per-row input an attention operator has; the gates are
per head). Learned parameters are drawn once from a torch.Generator seeded with `seed`. "Length" is n_i,
the number of keys row i sees (causal and padding-aware, as in `cab.attention.softmax_free`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cab.attention.engine.scores import RowwiseScoreAttention
from cab.registry import register_attention

ALL_PATTERNS = ("NS", "CS", "NC", "CC")


def _normal(generator: torch.Generator, *shape: int, std: float = 1.0) -> nn.Parameter:
    values = torch.randn(*shape, generator=generator, dtype=torch.float64) * std
    return nn.Parameter(values.to(torch.get_default_dtype()))


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def _gate(q: torch.Tensor, direction: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, H, R, 1): direction_h . q_i / sqrt(d) + bias_h, as an elementwise product (no matmul)."""
    return (q * direction[:, None, :]).sum(-1, keepdim=True) / math.sqrt(q.shape[-1]) + bias[:, None, None]


@register_attention(
    "selective_attention", patterns=ALL_PATTERNS, family="softmax-variant", exact=False, mechanism="M54",
    citation="Zhang et al., Selective Attention: Enhancing Transformer through Principled Context Control, "
    "NeurIPS 2024",
)
class SelectiveAttention(RowwiseScoreAttention):
    """Selective self-attention (SSA): softmax(tau_i s_i) with a query- and position-dependent inverse
    temperature tau_i, and temperature-scaled values.

        tau_i = (1 + tanh(u_h . q_i / sqrt(d) + c_h)) * (1 + alpha_h log n_i)      (query selectivity)
        v~_j  = (1 + tanh(r_h . v_j / sqrt(d))) v_j                                 (value selectivity)
        o_i   = sum_j softmax_j(tau_i s_ij) v~_j

    [EJ] The paper's temperature is a small learned function of the token (weight-shared with the query
    projection) times a position term growing like log of the position; on projected (q, k, v) we use a
    per-head linear gate of q_i for the token term and log n_i (n_i = keys row i sees: its position + 1
    under causal self) for the position term, and a per-head gate of v_j for the values. Per head: u, r
    (d each), c, alpha (one each): 2d + 2 parameters, under 0.5% of a d_model^2 projection as in the paper.
    With u = r = c = alpha = 0 it is softmax attention at 1/sqrt(d) (tau = v-gate = 1). Init: u, r ~
    N(0, 1) from `seed`, c = 0, alpha = `position_scale` (0.1). Differentiable everywhere.
    """

    def __init__(self, pattern, num_heads, head_dim, position_scale: float = 0.1, value_temperature: bool = True,
                 seed: int = 0, chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim, chunk_size)
        self.seed, self.value_temperature = seed, bool(value_temperature)
        generator = torch.Generator().manual_seed(seed)
        self.query_gate = _normal(generator, num_heads, head_dim)
        self.query_bias = nn.Parameter(torch.zeros(num_heads))
        self.position_scale = nn.Parameter(torch.full((num_heads,), float(position_scale)))
        self.value_gate = _normal(generator, num_heads, head_dim) if value_temperature else None

    def temperature(self, q: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        token = 1 + torch.tanh(_gate(q, self.param("query_gate", q.dtype), self.param("query_bias", q.dtype)))
        alpha = self.param("position_scale", q.dtype)[:, None, None]
        return token * (1 + alpha * torch.log(count))

    def prepare_values(self, v):
        if self.value_gate is None:
            return v
        gate = (v * self.param("value_gate", v.dtype)[:, None, :]).sum(-1, keepdim=True) / math.sqrt(v.shape[-1])
        return (1 + torch.tanh(gate)) * v

    def row_weights(self, scores, visible, count, q):
        return _masked_softmax(self.temperature(q, count) * scores, visible)

    def reference_row(self, scores, q):
        n, d = scores.shape[-1], q.shape[-1]
        token = 1 + torch.tanh((self.query_gate * q).sum(-1) / math.sqrt(d) + self.query_bias)  # (H,)
        tau = token * (1 + self.position_scale * math.log(n))
        return torch.softmax(tau[:, None] * scores, dim=-1)

    def reference_values(self, v):
        """Value selectivity key by key, every head at once: (1 + tanh(r_h . v_j / sqrt(d))) v_j."""
        if self.value_gate is None:
            return v
        d = v.shape[-1]
        gated = [(1 + torch.tanh((self.value_gate * v[:, j]).sum(-1) / math.sqrt(d)))[:, None] * v[:, j]
                 for j in range(v.shape[1])]
        return torch.stack(gated, dim=1)


@register_attention(
    "cog_attention", patterns=ALL_PATTERNS, family="softmax-variant", exact=False, mechanism="M55",
    citation="Lv et al., More Expressive Attention with Negative Weights (Cog Attention), arXiv 2411.07176 (2024)",
)
class CogAttention(RowwiseScoreAttention):
    """Cog attention: signed weights w_ij = sign(s_ij) * exp(|s_ij|) / sum_j' exp(|s_ij'|).

    The magnitudes form a softmax over |s| (so sum_j |w_ij| = 1) and the sign of the score is kept, so a
    head can copy (positive), delete (negative) or ignore (small) a token. [BG] This is the formulation
    of the paper's Eq. for Cog attention as summarised in MECHANISMS.md; verify against arXiv 2411.07176.
    sign() has derivative 0 (the gradient flows through |s|, whose derivative at 0 is taken as 0).
    """

    def __init__(self, pattern, num_heads, head_dim, chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim, chunk_size)

    def row_weights(self, scores, visible, count, q):
        return torch.sign(scores) * _masked_softmax(scores.abs(), visible)

    def reference_row(self, scores, q):
        magnitude = torch.exp(scores.abs() - scores.abs().max(-1, keepdim=True).values)
        return torch.sign(scores) * magnitude / magnitude.sum(-1, keepdim=True)


@register_attention(
    "affine_scaled_attention", patterns=ALL_PATTERNS, family="softmax-variant", exact=False, mechanism="M56",
    citation="Affine-Scaled Attention: Towards Flexible and Stable Transformer Attention (2025)",
)
class AffineScaledAttention(RowwiseScoreAttention):
    """Affine-scaled attention: an input-dependent scale and bias on the softmax weights,

        w_ij = alpha_i softmax_j(s_ij) + beta_i / n_i     (visible keys j; n_i of them)
        alpha_i = 2 sigmoid(a_h . q_i / sqrt(d) + b_h),   beta_i = tanh(e_h . q_i / sqrt(d) + f_h)

    so a row's total weight is alpha_i + beta_i instead of 1 (it can attend "less than fully", the role an
    attention sink plays in softmax), and beta spreads a signed uniform share over the visible keys.
    [EJ] The seed abstract gives only "input-dependent scaling and a corresponding bias term applied to
    softmax-normalized attention weights"; the shapes (one scalar scale and one scalar bias per query and
    head, computed from the query) and the bounded parametrisations are our choices, with the bias divided
    by n_i so that it is a share of a row whatever its length. At a_h = e_h = 0, b_h = f_h = 0 it is softmax
    attention. Init: a, e ~ N(0, 1) from `seed`, b = f = 0. Differentiable everywhere.
    """

    def __init__(self, pattern, num_heads, head_dim, seed: int = 0, chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim, chunk_size)
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.scale_gate = _normal(generator, num_heads, head_dim)
        self.scale_bias = nn.Parameter(torch.zeros(num_heads))
        self.bias_gate = _normal(generator, num_heads, head_dim)
        self.bias_bias = nn.Parameter(torch.zeros(num_heads))

    def row_weights(self, scores, visible, count, q):
        alpha = 2 * torch.sigmoid(_gate(q, self.param("scale_gate", q.dtype), self.param("scale_bias", q.dtype)))
        beta = torch.tanh(_gate(q, self.param("bias_gate", q.dtype), self.param("bias_bias", q.dtype)))
        return alpha * _masked_softmax(scores, visible) + (beta / count) * visible

    def reference_row(self, scores, q):
        d, n = q.shape[-1], scores.shape[-1]
        alpha = 2 / (1 + torch.exp(-((self.scale_gate * q).sum(-1) / math.sqrt(d) + self.scale_bias)))
        beta = torch.tanh((self.bias_gate * q).sum(-1) / math.sqrt(d) + self.bias_bias)
        return alpha[:, None] * torch.softmax(scores, dim=-1) + beta[:, None] / n
