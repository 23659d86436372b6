"""Gaussian adaptive attention (GAAM) transplanted onto the score row: weights are a Gaussian density of each
score under the row's own score mean and variance, with a learned mean offset and variance scale per
head. Dense O(L^2); query blocks (O(C L) memory), per-row reference, KV-cache decoding."""

from __future__ import annotations

import torch
from torch import nn

from cab.attention.engine.scores import RowwiseScoreAttention
from cab.registry import register_attention


@register_attention(
    "gaussian_adaptive_attention", patterns=("NS", "CS", "NC", "CC"), family="softmax-variant", exact=False,
    mechanism="M58",
    citation="Ioannides, Chadha & Elkins, Gaussian Adaptive Attention is All You Need: Robust Contextual "
    "Representations Across Multiple Modalities, arXiv 2401.11143 (2024)",
)
class GaussianAdaptiveAttention(RowwiseScoreAttention):
    """GAAM on attention scores. Per head h and query row i, over the n_i visible keys:

        mu_i    = mean_j s_ij + delta_h                        (learned mean offset)
        var_i   = xi_h * var_j s_ij + eps                       (learned variance scale, population variance)
        w_ij    = exp(-(s_ij - mu_i)^2 / (2 var_i)) / sum_j' exp(-(s_ij' - mu_i)^2 / (2 var_i))
        o_i     = sum_j w_ij v_j

    [EJ] The paper's GAAM is a multi-head Gaussian gate on features: each head normalises its inputs with
    their mean (plus a learned offset) and variance (times a learned scale) and multiplies them by the
    Gaussian density; it is "compatible with dot-product attention" but is not itself a (q, k, v) operator
    (MECHANISMS.md). cab's operator applies that gate to each query's score row — the inputs the operator
    has — and l1-normalises it (written as a softmax of the Gaussian log-density, which is stable when a
    row's variance is 0: a one-key row gives that key weight 1). It therefore attends to keys whose score
    sits near mean + delta rather than to the highest scores: with delta = 0 (the paper's offset init) it
    favours typical keys, and learning delta > 0 moves it towards softmax-like focus on high scores.
    Parameters (2 per head): `mean_offset` delta (init 0), `variance_scale` xi (init 1, kept positive as
    exp of a log parameter); eps = `eps`. Differentiable everywhere (the variance is clamped only by eps).
    """

    def __init__(self, pattern, num_heads, head_dim, mean_offset: float = 0.0, variance_scale: float = 1.0,
                 eps: float = 1e-5, chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim, chunk_size)
        if variance_scale <= 0 or eps <= 0:
            raise ValueError("variance_scale and eps must be positive")
        self.eps = float(eps)
        self.mean_offset = nn.Parameter(torch.full((num_heads,), float(mean_offset)))
        self.log_variance_scale = nn.Parameter(torch.full((num_heads,), float(variance_scale)).log())

    def row_weights(self, scores, visible, count, q):
        delta = self.param("mean_offset", scores.dtype)[:, None, None]
        xi = self.param("log_variance_scale", scores.dtype).exp()[:, None, None]
        s = scores * visible
        mean = s.sum(dim=-1, keepdim=True) / count
        var = ((scores - mean) * visible).square().sum(dim=-1, keepdim=True) / count
        logits = -(scores - mean - delta).square() / (2 * (xi * var + self.eps))
        return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)

    def reference_row(self, scores, q):
        n = scores.shape[-1]
        mean = scores.sum(-1, keepdim=True) / n
        var = ((scores - mean) ** 2).sum(-1, keepdim=True) / n
        xi = torch.exp(self.log_variance_scale)[:, None]
        log_density = -((scores - mean - self.mean_offset[:, None]) ** 2) / (2 * (xi * var + self.eps))
        density = torch.exp(log_density - log_density.max(-1, keepdim=True).values)  # the common factor cancels
        return density / density.sum(-1, keepdim=True)
