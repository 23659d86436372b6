"""Linear Log-Normal (LLN) attention: exponential feature maps exp(alpha q), exp(beta k) whose attention
weights are log-normal like softmax's, with alpha and beta set by moment matching."""

from __future__ import annotations

import functools
import math

import torch

from cab.attention.engine.feature_map import FeatureMapAttention
from cab.registry import register_attention


def log_weight_spread(scale: float, q: torch.Tensor, k: torch.Tensor) -> float:
    """Mean over queries of the variance over keys of LLN's log-weights log sum_d exp(scale (q_d + k_d))."""
    log_weights = torch.logsumexp(scale * (q[:, None, :] + k[None, :, :]), dim=-1)
    return float(log_weights.var(dim=1).mean())


@functools.lru_cache(maxsize=64)
def moment_matched_scale(head_dim: int, query_variance: float = 1.0, key_variance: float = 1.0,
                         samples: int = 128) -> float:
    """alpha = beta for which LLN's attention log-weights have, within a row, the variance of softmax's
    (q.k / sqrt(d): s_q^2 s_k^2 for Gaussian entries of variances s_q^2, s_k^2), under that Gaussian model:
    solved by bisection on a fixed-seed sample of `samples` queries and keys (the variance grows with
    alpha). Deterministic; cached per arguments."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(samples, head_dim, generator=gen, dtype=torch.float64) * math.sqrt(query_variance)
    k = torch.randn(samples, head_dim, generator=gen, dtype=torch.float64) * math.sqrt(key_variance)
    target = query_variance * key_variance
    low, high = 0.0, 1.0
    while log_weight_spread(high, q, k) < target:
        low, high = high, 2 * high
    for _ in range(20):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if log_weight_spread(mid, q, k) < target else (low, mid)
    return 0.5 * (low + high)


@register_attention(
    "lln", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M14",
    citation="Nahshan, Kampeas & Haleva, Linear Log-Normal Attention with Unbiased Concentration, ICLR 2024",
)
class LLNAttention(FeatureMapAttention):
    """Linear Log-Normal attention (paper Sec. 4): normalised linear attention with elementwise exponential
    feature maps phi_Q(q) = exp(alpha q), phi_K(k) = exp(beta k) (d features), so each weight
    sum_d exp(alpha q_d + beta k_d) is a sum of log-normals, approximately log-normal like softmax's.

    [BG] Moment matching: the paper picks alpha and beta so that the variance of LLN's (log-normal)
    attention log-weights matches softmax's, sigma_sm^2 = s_q^2 s_k^2 for q.k / sqrt(d) with Gaussian
    entries of variances s_q^2, s_k^2; it relates the two through a fitted approximation. cab takes
    alpha = beta and solves the matching directly under the same Gaussian model: the within-row variance
    of log sum_d exp(alpha (q_d + k_d)) equals s_q^2 s_k^2, by bisection on a fixed-seed sample
    (`moment_matched_scale`; about 1.9 for d = 16, 2.3 for d = 64 at unit variances). The paper estimates
    s_q, s_k from the running activations; statistics over the sequence would let a row depend on later
    tokens (CS, CC) and on padding, so cab fixes them at construction (`query_variance`, `key_variance`,
    default 1: unit-variance, layer-normalised inputs); `alpha`/`beta` override the matched value.
    LLN+Diag's block-diagonal softmax add-on is not included (a separate local term).

    Stabilisation: each query's exponent is shifted by its maximum over features (a per-row factor that
    cancels in the normalisation); keys are not shifted (a shift shared across keys would have to come
    from all of them). Padded keys are zeroed before the map and their features set to 0.
    Patterns: NS/NC/CC with the global key summary, CS with the tiled causal product (bottom-right aligned
    when Lq != Lk). Decoding keeps (phi_K^T V, phi_K^T 1).
    """

    def __init__(self, pattern, num_heads, head_dim, alpha: "float | None" = None, beta: "float | None" = None,
                 query_variance: float = 1.0, key_variance: float = 1.0):
        super().__init__(pattern, num_heads, head_dim)
        if query_variance <= 0 or key_variance <= 0:
            raise ValueError(f"variances must be positive, got {query_variance} and {key_variance}")
        matched = moment_matched_scale(head_dim, float(query_variance), float(key_variance))
        self.alpha = matched if alpha is None else float(alpha)
        self.beta = matched if beta is None else float(beta)
        self.query_variance, self.key_variance = query_variance, key_variance

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:.4g}, beta={self.beta:.4g}"

    def features(self, q, k):
        phi_q = phi_k = None
        if q is not None:
            exponent = self.alpha * q
            phi_q = torch.exp(exponent - exponent.amax(dim=-1, keepdim=True).detach())
        if k is not None:
            phi_k = torch.exp(self.beta * k)
        return phi_q, phi_k

    def feature_dim(self) -> int:
        return self.head_dim
