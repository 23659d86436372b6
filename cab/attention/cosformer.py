"""cosFormer: ReLU linear attention re-weighted by cos(pi/2 * (i - j) / M), decomposed into two linear
attentions with sin/cos-modulated features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.masks import query_offset
from cab.attention.engine.prefix_sums import pattern_linear_attention
from cab.attention.engine.prepare import compute_dtype, nonzero, prepare
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention

# M for the causal patterns when max_len is not given: it must not depend on how long the input is,
# so it is a constant; 65536 covers cab's longest sweeps (longer inputs raise).
CAUSAL_MAX_LEN = 65536


@register_attention(
    "cosformer", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False,
    citation="Qin et al., cosFormer: Rethinking Softmax in Attention, ICLR 2022",
)
class CosformerAttention(Attention):
    """cosFormer (paper Sec. 3.2-3.3, Eq. 9-11): weights s_ij = relu(q_i)^T relu(k_j) cos(pi/2 (i - j) / M),
    normalised over the visible keys. Since cos(a - b) = cos a cos b + sin a sin b, this is one linear
    attention with features [relu(x) sin(pi x_pos / 2M), relu(x) cos(pi x_pos / 2M)] (2d features),
    O(L d^2), with prefix sums in chunks for causal self attention.

    M (the re-weighting horizon, `max_len`): noncausal patterns use max(Lq, Lk) as in the paper and CAB,
    but measured over the real positions only — the key span is 1 + the last real key's index, and in NS
    with Lq == Lk queries share the keys' padding — so appending padded keys does not change M (CAB's
    cosFormer ignored the padding mask altogether). Causal patterns cannot take M from the length (row i
    would depend on how many tokens follow), so they use a constant M = `max_len`, default 65536, and
    inputs longer than M raise (the cosine would turn negative). CS is bottom-right aligned when
    Lq != Lk; CC uses the key summary of all keys for every row, and query positions 0..Lq-1.
    Padded keys get zero features. A row whose weights are all zero (relu features orthogonal or no
    visible key) outputs 0, where CAB clamped the normaliser at 1e-6.
    """

    def __init__(self, pattern, num_heads, head_dim, max_len: "int | None" = None):
        super().__init__(pattern, num_heads, head_dim)
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.max_len = max_len

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_len={self.max_len}"

    def horizon(self, lq: int, lk: int, key_padding_mask: "torch.Tensor | None", device) -> torch.Tensor:
        """M per batch element, shape (B or 1, 1, 1, 1); raises when a position would reach M."""
        if self.causal:
            horizon = self.max_len or CAUSAL_MAX_LEN
            if max(lq, lk) > horizon:
                raise ValueError(f"cosformer: length {max(lq, lk)} exceeds the re-weighting horizon M={horizon}; "
                                 "set max_len")
            return torch.tensor(float(horizon), device=device).reshape(1, 1, 1, 1)
        if key_padding_mask is None:
            span = torch.full((1,), max(lq, lk), device=device)
        else:
            positions = torch.arange(1, lk + 1, device=device)
            key_span = torch.where(key_padding_mask.bool(), 0, positions).amax(dim=-1)
            query_span = key_span if (self.pattern is Pattern.NS and lq == lk) else torch.full_like(key_span, lq)
            span = torch.maximum(torch.maximum(key_span, query_span), torch.ones_like(key_span))
        if self.max_len is not None:
            if int(span.max()) > self.max_len:
                raise ValueError(f"cosformer: span {int(span.max())} exceeds max_len={self.max_len}")
            span = torch.full_like(span, self.max_len)
        return span.reshape(-1, 1, 1, 1)

    @staticmethod
    def _features(x: torch.Tensor, positions: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
        angle = (math.pi / 2) * positions.reshape(1, 1, -1, 1) / horizon
        relu = F.relu(x)
        return torch.cat([relu * torch.sin(angle), relu * torch.cos(angle)], dim=-1)

    def forward(self, q, k, v, key_padding_mask=None):
        horizon = self.horizon(q.shape[-2], k.shape[-2], key_padding_mask, q.device).to(compute_dtype(q.dtype))
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        dtype = q.dtype
        positions_q = torch.arange(q.shape[-2], device=q.device, dtype=dtype)
        positions_k = torch.arange(k.shape[-2], device=q.device, dtype=dtype)
        phi_q = self._features(q, positions_q, horizon)
        phi_k = self._features(k, positions_k, horizon)
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        out = pattern_linear_attention(self.pattern is Pattern.CS, phi_q, phi_k, v)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk weights relu(q_i) relu(k_j) cos(pi/2 (p_i - j)/M) (p_i = i, or i + Lk - Lq
        in CS), masked by the pattern and padding, row-normalised, times V."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        horizon = self.horizon(lq, lk, key_padding_mask, q.device).to(q.dtype)
        offset = query_offset(self.pattern, lq, lk)
        rows = torch.arange(lq, device=q.device, dtype=q.dtype).unsqueeze(1) + offset
        cols = torch.arange(lk, device=q.device, dtype=q.dtype).unsqueeze(0)
        reweight = torch.cos((math.pi / 2) * (rows - cols) / horizon)  # (B or 1, 1, Lq, Lk)
        weights = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * reweight
        weights = weights * attention_mask(self.pattern, lq, lk, key_padding_mask, q.device)
        den = weights.sum(dim=-1, keepdim=True)
        return (weights @ v) / nonzero(den)
