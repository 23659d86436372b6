"""Softmax replacements that keep the pairwise scores s_ij = q_i.k_j / sqrt(d) but change the map from a
score row to weights: softplus with a length scale and re-weighting (M51), ReLU (M52) and unnormalised
sigmoid (M53). All three are dense O(L^2) in time; the forward runs in query blocks (O(C L) memory, see
`cab.attention._score_util`), the reference is a per-row loop, and causal self/cross decode from a KV cache.

Every quantity that depends on "the length" uses n_i, the number of keys row i sees (its pattern and key
padding): that is the sequence length for a noncausal unpadded row, i + 1 for causal self (bottom-right:
i + 1 + Lk - Lq), and it is what a decoder knows at step i. A global length would make causal rows depend
on future tokens and padded rows depend on the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cab.attention.engine.scores import RowwiseScoreAttention
from cab.registry import register_attention

ALL_PATTERNS = ("NS", "CS", "NC", "CC")


@register_attention(
    "softplus_attention", patterns=ALL_PATTERNS, family="softmax-variant", exact=False, mechanism="M51",
    citation="Gao & Spratling, Softplus Attention with Re-weighting Boosts Length Extrapolation in Large "
    "Language Models, arXiv 2501.13428 (2025); ICML 2026",
)
class SoftplusAttention(RowwiseScoreAttention):
    """Length-scaled softplus attention with re-weighting (LSSAR).

    Stage 1 (LSSA): softmax is read as "a positive non-linearity, then l1 normalisation"; the exponential is
    replaced by Softplus and the scores get a dynamic, length-dependent scale from entropy invariance:

        a_ij = Softplus(lambda_i s_ij) / sum_j' Softplus(lambda_i s_ij'),   lambda_i = log n_i

    (n_i the number of keys row i sees; `length_scale=False` uses lambda_i = 1).
    Stage 2 (re-weighting, "amplifies significant attention weights while diminishing weaker ones"):

        w_ij = a_ij^p / sum_j' a_ij'^p,   p = `power` (p = 1 switches it off)

    [BG] The paper's exact scale and re-weighting formulas were not available to us (the seed gives only
    the abstract; no public copy of the code could be read): lambda_i = log n_i follows the abstract's
    "scale factor ... based on invariance entropy" (growing like log n), and the power re-weighting is
    our reading of the sharpening step; p = 3 is our default. Check against arXiv 2501.13428 Sec. 3-4
    before relying on exact numbers.

    Length extrapolation: the paper claims validation loss held nearly constant at 16x the training
    length; cab's LM task with its extrapolation curve (train short, evaluate up to 16x) is where that
    claim is tested. Everything is differentiable (Softplus is smooth; a^p with p > 1 is C^1).
    """

    def __init__(self, pattern, num_heads, head_dim, power: float = 3.0, length_scale: bool = True,
                 chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim, chunk_size)
        if power < 1:
            raise ValueError(f"power must be >= 1 (a sharpening), got {power}")
        self.power, self.length_scale = float(power), bool(length_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, power={self.power}, length_scale={self.length_scale}"

    def row_weights(self, scores, visible, count, q):
        if self.length_scale:
            scores = scores * torch.log(count)
        a = F.softplus(scores) * visible
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        if self.power != 1.0:
            a = a.pow(self.power)
            a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        return a

    def reference_row(self, scores, q):
        n = scores.shape[-1]
        lam = torch.log(torch.tensor(float(n), dtype=scores.dtype)) if self.length_scale else 1.0
        a = torch.log1p(torch.exp(lam * scores))
        a = a / a.sum(-1, keepdim=True)
        w = a ** self.power
        return w / w.sum(-1, keepdim=True)


@register_attention(
    "relu_attention", patterns=ALL_PATTERNS, family="softmax-variant", exact=False, mechanism="M52",
    citation="Shen et al., A Study on ReLU and Softmax in Transformer, arXiv 2302.06461 (2023); "
    "Wortsman et al., Replacing softmax with ReLU in Vision Transformers, arXiv 2309.08586 (2023)",
)
class ReLUAttention(RowwiseScoreAttention):
    """ReLU attention: w_ij = ReLU(s_ij) / n_i (`normalize="length"`, default) or ReLU(s_ij)
    (`normalize="none"`, the non-normalised form that has no attention sink).

    [EJ] ReLUFormer pairs the unnormalised ReLU with a normalisation after the value product (a layer norm
    in the block, outside the attention operator); inside the operator we divide by the number of visible
    keys n_i (Wortsman et al.'s L^-1 with L the row's own key count, which keeps outputs length-stable
    and causal). Weights are not a distribution and a row whose scores are all negative outputs 0. ReLU's
    derivative at 0 is taken as 0.
    """

    def __init__(self, pattern, num_heads, head_dim, normalize: str = "length", chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim, chunk_size)
        if normalize not in ("length", "none"):
            raise ValueError(f"normalize must be 'length' or 'none', got {normalize!r}")
        self.normalize = normalize

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize!r}"

    def row_weights(self, scores, visible, count, q):
        w = torch.relu(scores) * visible
        return w / count if self.normalize == "length" else w

    def reference_row(self, scores, q):
        w = torch.where(scores > 0, scores, torch.zeros_like(scores))
        return w / scores.shape[-1] if self.normalize == "length" else w


@register_attention(
    "sigmoid_attention", patterns=ALL_PATTERNS, family="softmax-variant", exact=False, mechanism="M53",
    citation="Gu et al., When Attention Sink Emerges in Language Models: An Empirical View, ICLR 2025; "
    "bias: Ramapuram et al., Theory, Analysis, and Best Practices for Sigmoid Self-Attention, ICLR 2025",
)
class SigmoidAttention(RowwiseScoreAttention):
    """Sigmoid attention without normalisation: w_ij = sigmoid(s_ij + b_i), with b_i = -log n_i
    (`bias=None`, the default of Ramapuram et al., who set b = -log(n) for sequence length n) or a fixed
    `bias`.

    The bias uses the row's own key count n_i rather than the whole sequence length so that causal rows
    do not depend on later tokens and padded keys change nothing (for an unpadded noncausal row it is
    the sequence length). Rows are not normalised: weights are independent per key, which is why no
    attention sink forms (Gu et al.). Differentiable everywhere.
    """

    def __init__(self, pattern, num_heads, head_dim, bias: "float | None" = None, chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim, chunk_size)
        self.bias = None if bias is None else float(bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias}"

    def row_weights(self, scores, visible, count, q):
        bias = -torch.log(count) if self.bias is None else self.bias
        return torch.sigmoid(scores + bias) * visible

    def reference_row(self, scores, q):
        n = scores.shape[-1]
        bias = -torch.log(torch.tensor(float(n), dtype=scores.dtype)) if self.bias is None else self.bias
        return 1.0 / (1.0 + torch.exp(-(scores + bias)))
