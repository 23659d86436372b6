"""RCMHA: relative convolutional multi-head attention — depth-wise convolutions of the queries, keys and
values along the sequence, then softmax attention with relative-position key embeddings. Dense O(L^2);
the attention runs in query blocks (no L x L tensor), the convolutions are O(L)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.masks import query_offset
from cab.attention.engine.prepare import compute_dtype, softmax_scale
from cab.attention.engine.scores import blocked_rows, reference_rows
from cab.registry import register_attention

_CROSS = ("relative positions j - i need queries and keys on one position axis; between two different "
          "sequences they are undefined")


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y_t = sum_a weight[h, c, a] x_{t - (K - 1) + a} per channel (zeros before the start): x (B, H, L, D),
    weight (H, D, K)."""
    b, h, length, d = x.shape
    taps = weight.shape[-1]
    flat = F.pad(x.permute(0, 1, 3, 2).reshape(b, h * d, length), (taps - 1, 0))
    y = F.conv1d(flat, weight.reshape(h * d, 1, taps), groups=h * d)
    return y.reshape(b, h, d, length).permute(0, 1, 3, 2)


@register_attention(
    "rcmha", patterns=("NS", "CS"), family="softmax-variant", exact=False, mechanism="M61.rcmha",
    citation="Sugiharto et al., RCMHA: Relative Convolutional Multi-Head Attention for Natural Language "
    "Modelling, arXiv 2308.03429 (2023)",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class RelativeConvAttention(Attention):
    """RCMHA on projected heads: a depth-wise (per head and channel) convolution of q, k and v along the
    sequence, then softmax attention with Shaw-style relative key embeddings,

        q~ = conv_q(q), k~ = conv_k(k), v~ = conv_v(v)          (kernel `kernel_size`, past positions only)
        e_ij = q~_i . (k~_j + r_clip(j - p_i)) / sqrt(d),   r_m learned for m in [-R, R] (R = `max_distance`)
        o_i  = sum_j softmax_j(e_ij) v~_j

    p_i is query i's position (i; i + Lk - Lq under CS, bottom-right). [EJ] The paper applies depth-wise
    convolution to Q, K and V and relative positional encoding in multi-head attention; it does not fix
    the kernel here, so we use kernel 3 over the current and previous two positions (past-only in every
    pattern so that CS stays causal and NS uses the same operator), Shaw et al.'s clipped relative key
    embeddings shared by the heads with R = 16, the conv kernels initialised to the identity (a delta at
    the current position) plus N(0, `init_std`^2) noise and the embeddings to N(0, 0.02^2), from `seed`.
    Key padding: padded keys, values (and, in these self patterns, the queries at padded positions) are
    zeroed before the convolutions, so their content reaches nothing; they are masked in the softmax.
    NC/CC are unsupported (relative positions need one axis). No incremental decoding: the query
    convolution needs the previous queries, which the decode API's prefill does not carry.
    """

    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, kernel_size: int = 3, max_distance: int = 16,
                 init_std: float = 0.02, seed: int = 0, chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim)
        if kernel_size < 1 or max_distance < 0 or chunk_size < 1:
            raise ValueError("kernel_size and chunk_size must be positive, max_distance non-negative")
        self.kernel_size, self.max_distance, self.seed, self.chunk_size = kernel_size, max_distance, seed, chunk_size
        generator = torch.Generator().manual_seed(seed)
        convs = []
        for _ in range(3):
            w = torch.zeros(num_heads, head_dim, kernel_size, dtype=torch.float64)
            w[..., -1] = 1.0
            w += init_std * torch.randn(w.shape, generator=generator, dtype=torch.float64)
            convs.append(nn.Parameter(w.to(torch.get_default_dtype())))
        self.conv_q, self.conv_k, self.conv_v = convs
        table = 0.02 * torch.randn(2 * max_distance + 1, head_dim, generator=generator, dtype=torch.float64)
        self.relative = nn.Parameter(table.to(torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}, max_distance={self.max_distance}"

    def _offset(self, lq: int, lk: int) -> int:
        return query_offset(self.pattern, lq, lk)

    def _query_padding(self, key_padding_mask, lq, lk):
        """(B, Lq) bool: query rows at padded positions (positions before the first key count as padded)."""
        positions = torch.arange(lq, device=key_padding_mask.device) + self._offset(lq, lk)
        inside = (positions >= 0) & (positions < lk)
        padded = key_padding_mask[:, positions.clamp(0, lk - 1)] & inside
        return padded | (positions < 0)

    def _block(self, q, k, v, visible, positions):
        scale = softmax_scale(q.shape[-1])
        index = (torch.arange(k.shape[-2], device=q.device)[None, :] - positions[:, None])
        index = index.clamp(-self.max_distance, self.max_distance) + self.max_distance  # (R, K)
        rel = q @ self.relative.to(q.dtype).transpose(-1, -2)  # (B, H, R, 2M + 1)
        rel = torch.gather(rel, -1, index.expand(*q.shape[:2], *index.shape))
        scores = (q @ k.transpose(-1, -2) + rel) * scale
        opened = visible | ~visible.any(dim=-1, keepdim=True)
        return torch.softmax(scores.masked_fill(~opened, float("-inf")), dim=-1) @ v

    def _convolved(self, q, k, v, key_padding_mask):
        dtype = compute_dtype(q.dtype)
        q = q.to(dtype)
        k, v = repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype)
        if key_padding_mask is not None:
            pad = key_padding_mask.to(device=q.device, dtype=torch.bool)
            k = k.masked_fill(pad[:, None, :, None], 0.0)
            v = v.masked_fill(pad[:, None, :, None], 0.0)
            q = q.masked_fill(self._query_padding(pad, q.shape[-2], k.shape[-2])[:, None, :, None], 0.0)
        return q, k, v

    def forward(self, q, k, v, key_padding_mask=None):
        out_dtype = q.dtype
        q, k, v = self._convolved(q, k, v, key_padding_mask)
        q = causal_depthwise_conv(q, self.conv_q.to(q.dtype))
        k = causal_depthwise_conv(k, self.conv_k.to(q.dtype))
        v = causal_depthwise_conv(v, self.conv_v.to(q.dtype))
        offset = self._offset(q.shape[-2], k.shape[-2])
        key_ok = None if key_padding_mask is None else ~key_padding_mask.to(device=q.device, dtype=torch.bool)

        def positions(qs, qe, kend):  # the query rows' key positions, for the relative terms
            return (torch.arange(qs, qe, device=q.device) + offset,)

        out = blocked_rows(self._block, q, k, v, self.pattern, key_ok, offset, self.chunk_size,
                           torch.is_grad_enabled(), positions)
        return out.to(out_dtype)

    def peak_memory_estimate(self, batch, lq, lk, kv_heads, mode, dtype):
        """(B, H, C, Lk) blocks in the compute dtype (scores, relative logits, softmax, masks) and the
        convolved q, k, v with the output; the backward recomputes one checkpointed block at a time. With
        margin over cab's CPU memory probe."""
        item = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        block = batch * self.num_heads * min(lq, self.chunk_size) * lk * item
        rows = 4 * batch * self.num_heads * max(lq, lk) * self.head_dim * item
        return int((16 if mode in ("bwd", "fwdbwd") else 8) * block + 8 * rows)

    def reference(self, q, k, v, key_padding_mask=None):
        """Convolutions as explicit sums over each position's window, then row by row: relative-embedding
        scores over the visible keys, softmax, values."""
        q, k, v = self._convolved(q, k, v, key_padding_mask)

        def conv(x, w):
            taps = w.shape[-1]
            rows = []
            for t in range(x.shape[-2]):
                acc = torch.zeros_like(x[:, :, 0])
                for a in range(taps):
                    src = t - (taps - 1) + a
                    if src >= 0:
                        acc = acc + w[None, :, :, a] * x[:, :, src]
                rows.append(acc)
            return torch.stack(rows, dim=2)

        q, k, v = conv(q, self.conv_q), conv(k, self.conv_k), conv(v, self.conv_v)
        dim = q.shape[-1]
        offset = self._offset(q.shape[-2], k.shape[-2])

        def row(b, i, idx):
            rel = self.relative[(idx - (i + offset)).clamp(-self.max_distance, self.max_distance) + self.max_distance]
            scores = ((k[b][:, idx] + rel) * q[b, :, i].unsqueeze(1)).sum(-1) / dim**0.5  # (H, n)
            return (torch.softmax(scores, -1).unsqueeze(1) @ v[b][:, idx]).squeeze(1)

        return reference_rows(self.pattern, q, k.shape[-2], v.shape[-1], key_padding_mask, row)
