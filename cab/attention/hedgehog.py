"""Hedgehog: linear attention with a trainable, softmax-mimicking feature map (per-head linear layer and
exp(+/-) features), plus the attention-distillation loss that trains it."""

from __future__ import annotations

import torch
from torch import nn

from cab.attention.base import repeat_kv
from cab.attention.engine.feature_map import FeatureMapAttention, dense_visible
from cab.attention.engine.prepare import nonzero, softmax_scale
from cab.registry import register_attention


@register_attention(
    "hedgehog", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M11",
    citation="Zhang, Bhatia, Kumbong & Re, The Hedgehog & the Porcupine: Expressive Linear Attentions with "
    "Softmax Mimicry, ICLR 2024",
)
class HedgehogAttention(FeatureMapAttention):
    """Hedgehog (paper Sec. 4, Eq. 3-4): normalised linear attention with the trainable feature map
    phi(x) = softmax_dim([W x + b, -(W x + b)]) (2d features), one linear layer per head, initialised to the
    identity with zero bias, separate maps for queries and keys (as fla and LoLCATs by default).

    [BG] The paper writes phi as the elementwise exponentials [exp(Wx + b), exp(-Wx - b)]; cab normalises
    them with one softmax over the 2d features (a positive scale per token): numerically safe and, for
    queries, the same output (the scale cancels in the row normalisation); for keys it reweights each key
    by 1 / sum(exp). Keys' maps are per query head (grouped keys are expanded first). Parameters are
    learnable (counted by `parameters()`); `seed` draws an optional Gaussian perturbation of the identity of
    standard deviation `init_noise` (0: the paper's identity init), so the same seed gives the same module.

    The two public implementations (read at fla bc3b101, LoLCATs 375df84) differ from this and each other:
    - fla (fla-org/flash-linear-attention, `fla/modules/feature_map.py`, `HedgehogFeatureMap`): one
      nn.Linear(d, d) with bias shared by all heads (cab: one per head), identity init and zero bias as
      here, and softmax([2y, -2y]) over the 2d features with y = Wx + b, a factor 2 that cab does not
      have: fla's map with (W, b) is cab's with (2W, 2b), so at the identity init it is cab's map at 2x.
    - LoLCATs (HazyResearch/lolcats, `src/model/feature_map.py`, `SoftmaxDim` after `FeatureMapMLP`): per
      head x W with W (d, f) (f = 64 in its configs, 2f features), no bias in its configs (its optional
      bias is one scalar per head), Kaiming-uniform init (the identity only with `zero_init`), and
      [softmax_f(xW), softmax_f(-xW)] clamped at 1e-12: each half is normalised on its own, so a token's
      features are not one positive multiple of the paper's exponentials (the halves get different
      scales) and the output differs from cab's for queries too. Its query and key maps start equal
      (the key map is a deep copy of the query map); cab's are drawn separately when `init_noise` > 0.

    `distillation_loss(q, k, key_padding_mask)` is the paper's attention distillation objective (Eq. 5):
    the cross-entropy between softmax attention weights softmax(q k^T / sqrt(d)) (the teacher, detached)
    and Hedgehog's normalised weights, averaged over the query rows that see a key, under this module's
    pattern. It is quadratic (it forms both L x L maps), meant for short distillation sequences.

    Patterns: NS/NC/CC use the global key summary (no row reads another query); CS the tiled causal
    product (bottom-right aligned when Lq != Lk). Padded keys have zero features; a row with no visible
    key outputs 0. Decoding keeps (phi(K)^T V, phi(K)^T 1).
    """

    def __init__(self, pattern, num_heads, head_dim, seed: int = 0, init_noise: float = 0.0):
        super().__init__(pattern, num_heads, head_dim)
        if init_noise < 0:
            raise ValueError(f"init_noise must be non-negative, got {init_noise}")
        self.seed, self.init_noise = seed, init_noise
        generator = torch.Generator().manual_seed(seed)
        eye = torch.eye(head_dim).expand(num_heads, head_dim, head_dim)

        def weight() -> nn.Parameter:
            noise = torch.randn(num_heads, head_dim, head_dim, generator=generator) * init_noise
            return nn.Parameter((eye + noise).to(torch.get_default_dtype()))

        self.weight_q, self.weight_k = weight(), weight()
        self.bias_q = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.bias_k = nn.Parameter(torch.zeros(num_heads, head_dim))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, init_noise={self.init_noise}"

    @staticmethod
    def _map(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax over [Wx + b, -(Wx + b)] per head: x (B, H, L, d) -> (B, H, L, 2d)."""
        projected = torch.einsum("bhld,hed->bhle", x, weight.to(x.dtype)) + bias.to(x.dtype)[None, :, None, :]
        return torch.softmax(torch.cat([projected, -projected], dim=-1), dim=-1)

    def features(self, q, k):
        phi_q = None if q is None else self._map(q, self.weight_q, self.bias_q)
        phi_k = None if k is None else self._map(k, self.weight_k, self.bias_k)
        return phi_q, phi_k

    def feature_dim(self) -> int:
        return 2 * self.head_dim

    def feature_flops(self, batch, lq, lk):
        return 2 * batch * self.num_heads * (lq + lk) * self.head_dim * self.head_dim

    def distillation_loss(self, q: torch.Tensor, k: torch.Tensor,
                          key_padding_mask: "torch.Tensor | None" = None) -> torch.Tensor:
        """Cross-entropy H(softmax teacher, hedgehog student) over the visible keys, mean over rows that see
        a key: -sum_j A_ij log(Ahat_ij). Gradients reach the feature maps (and q, k through the student);
        the softmax teacher is detached."""
        k = repeat_kv(k, q.shape[1])
        visible = dense_visible(self, q.shape[-2], k.shape[-2], key_padding_mask, q.device, q.dtype)
        scores = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])
        scores = scores.masked_fill(visible == 0, float("-inf"))
        seen = (visible > 0).any(dim=-1, keepdim=True).expand(scores.shape[:-1] + (1,))
        teacher = torch.softmax(torch.where(seen, scores, torch.zeros_like(scores)), dim=-1).detach() * visible
        phi_q, phi_k = self.features(q, k)
        weights = (phi_q @ phi_k.transpose(-1, -2)) * visible
        student = weights / nonzero(weights.sum(dim=-1, keepdim=True))
        log_student = torch.log(torch.where(teacher > 0, student, torch.ones_like(student)))
        rows = -(teacher * log_student).sum(dim=-1)
        seen = seen.squeeze(-1).expand_as(rows)
        return rows[seen].mean()
