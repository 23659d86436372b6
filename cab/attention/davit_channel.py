"""DaViT's channel attention (M27): attention over the channels of each head (a d x d map computed from all
tokens) instead of over the tokens, so the cost is linear in the length."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prepare import compute_dtype, grouped_compute, real_keys, set_positive, softmax_scale
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention

_SUB = 16  # rows per block of the in-chunk prefix sums (see _prefix_grams)


def _prefix_grams(gram: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """gram + s sum_{j<=t} k_j v_j^T for every t of k (B, H, C, d), v (B, H, C, dv): (B, H, C, d, dv); gram
    (B, H, d, dv); tri (S, S) s times a lower-triangular ones matrix. Prefix sums within blocks of S rows as
    one matmul with tri, then each block adds the running total of the blocks before it (and gram): several
    times faster than cumsum over the (C, d, dv) outer products on CPU, forward and backward."""
    c, sub = k.shape[-2], tri.shape[0]
    outer = (k[..., :, None] * v[..., None, :]).flatten(-2)  # (B, H, C, d dv)
    outer = F.pad(outer, (0, 0, 0, -c % sub)).unflatten(-2, (-1, sub))  # (B, H, C / S, S, d dv)
    inner = tri @ outer
    before = F.pad(inner[..., :-1, -1, :].cumsum(dim=-2), (0, 0, 1, 0)) + gram.flatten(-2)[:, :, None]
    grams = inner.add_(before[..., None, :]).flatten(2, 3)[:, :, :c]
    return grams.unflatten(-1, (k.shape[-1], v.shape[-1]))


@dataclass(frozen=True)
class ChannelState:
    """Decoding state: CS the running channel Gram sum_j k_j v_j^T (B, H, d, d) and the number of real
    keys so far (B,); CC the finished channel map softmax(scale * K^T V) and whether any key is real."""

    gram: torch.Tensor
    real: torch.Tensor


@register_attention(
    "davit_channel", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M27",
    citation="Ding et al., DaViT: Dual Attention Vision Transformers, ECCV 2022",
)
class ChannelAttention(Attention):
    """Channel (transposed) attention of DaViT (Ding et al. 2022, Sec. 3.2, "channel group attention"):
    each head is one channel group of d channels; the attention map is d x d over channels,

        A = softmax_rows(d^-1/2 * K^T V),    out_t = A q_t   (out = Q A^T),

    the sum K^T V = sum_j k_j v_j^T running over tokens. The paper writes A(Q, K, V) = (softmax(Q^T K /
    sqrt(C)) V^T)^T; the released code (ChannelAttention.forward: k * scale; attention = k^T v; softmax over
    the last dim; x = (attention @ q^T)^T) computes the same operator with the three projections named
    differently. Since all three are projections of the same tokens in DaViT, the two are the same model;
    cab takes the code's roles because then the channel map is a summary of the *keys and values* applied to
    each query, which is what cab's (q, k, v) contract can evaluate in every pattern:

    - NS, NC: one map from all real keys; CC: the same (row t uses the map of the whole memory and only its
      own query, so it is query-causal).
    - CS (a prefix variant, not in the paper, which is noncausal vision): query t uses the map of the keys
      j <= t (bottom-right aligned when Lq != Lk: query t sits at key position t + Lk - Lq),
      A_t = softmax(d^-1/2 * sum_{j<=t} k_j v_j^T). Computed in chunks of `chunk_size` queries: the chunk's
      prefix Grams (C x d x d) from the entering Gram plus a cumulative sum, so memory is O(C d^2) per chunk
      without autograd (O(L d^2) with it, still linear).
    Padded keys are left out of the Gram; a query with no visible key outputs 0 (rather than the uniform
    map's channel mean of its query). Unlike token attention, the output is a channel mixture of the query,
    not of the values. Everything is differentiable. Decoding keeps the d x d Gram (CS) or the finished map
    (CC): O(d^2) per head, independent of the length.
    """

    complexity = {"time": 1, "memory": 1}

    repr_fields = ("chunk_size",)

    def __init__(self, pattern, num_heads, head_dim, chunk_size: int = 128):
        super().__init__(pattern, num_heads, head_dim)
        set_positive(self, chunk_size=chunk_size)

    def _masked_keys(self, k, key_padding_mask):
        if key_padding_mask is None:
            return k
        return k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, out_dtype = grouped_compute(q, k, v)
        scale = softmax_scale(q.shape[-1])
        b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
        k = self._masked_keys(k, key_padding_mask)
        real = real_keys(key_padding_mask, b, lk, q.device)
        if self.pattern is not Pattern.CS:
            attn = torch.softmax(scale * (k.transpose(-1, -2) @ v), dim=-1)  # (B, H, d, d)
            out = q @ attn.transpose(-1, -2)
            seen = real.any(dim=-1)[:, None, None, None]
            return torch.where(seen, out, torch.zeros_like(out)).to(out_dtype)
        offset = lk - lq
        # keys before the first query's position enter as the initial Gram; Grams are kept scaled by s
        start = max(0, offset)
        gram = scale * (k[:, :, :start].transpose(-1, -2) @ v[:, :, :start]) if start else \
            q.new_zeros(b, q.shape[1], q.shape[-1], v.shape[-1])
        count = real[:, :start].sum(dim=-1)
        tri = torch.full((_SUB, _SUB), scale, dtype=q.dtype, device=q.device).tril()  # prefix sums, scaled
        outputs = []
        for qs in range(0, lq, self.chunk_size):
            qe = min(lq, qs + self.chunk_size)
            # key positions of queries qs..qe-1 are qs+offset..qe-1+offset; those below 0 see nothing new
            ks, ke = max(0, qs + offset), max(0, qe + offset)
            if ke - ks == qe - qs:  # every query of the chunk has a key position (the usual case)
                grams = _prefix_grams(gram, k[:, :, ks:ke], v[:, :, ks:ke], tri)  # (B, H, C, d, d)
                counts = count[:, None] + real[:, ks:ke].long().cumsum(dim=-1)
            else:  # Lq > Lk: the chunk's first queries sit before the first key and see nothing
                grams = torch.zeros(b, q.shape[1], qe - qs, q.shape[-1], v.shape[-1], dtype=q.dtype, device=q.device)
                counts = torch.zeros(b, qe - qs, dtype=count.dtype, device=q.device)
                if ke > ks:
                    rows = slice(qe - qs - (ke - ks), qe - qs)
                    grams[:, :, rows] = _prefix_grams(gram, k[:, :, ks:ke], v[:, :, ks:ke], tri)
                    counts[:, rows] = count[:, None] + real[:, ks:ke].long().cumsum(dim=-1)
            gram, count = grams[:, :, -1], counts[:, -1]
            attn = torch.softmax(grams, dim=-1)
            # A_t q_t per row as a broadcast product and a sum: one small matmul per token is slow
            out = (attn * q[:, :, qs:qe, None, :]).sum(dim=-1)
            outputs.append(torch.where((counts > 0)[:, None, :, None], out, torch.zeros_like(out)))
        return torch.cat(outputs, dim=2).to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Per query row: the Gram of its visible keys (pattern and padding mask) summed explicitly,
        softmax over channels, applied to the query; rows with no visible key are 0."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        visible = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        visible = visible.expand(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]).to(q.dtype)
        outer = k[..., :, None] * v[..., None, :]  # (B, H, Lk, d, d)
        grams = torch.einsum("bhij,bhjcd->bhicd", visible, outer)
        attn = torch.softmax(softmax_scale(q.shape[-1]) * grams, dim=-1)
        out = (attn @ q[..., None]).squeeze(-1)
        return out * (visible.sum(dim=-1, keepdim=True) > 0)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """Matmuls: K^T V and applying the map. CS is undeclared (None): its prefix Grams and their
        application are elementwise products and sums (about 6 L d^2 operations per head, plus the
        softmax over L d^2 entries), which a matmul count does not see."""
        bh, d = batch * self.num_heads, self.head_dim
        if self.pattern is Pattern.CS:
            return None
        return 2 * bh * (lk * d * d + lq * d * d)

    # decoding -----------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        if not self.causal:
            raise ValueError(f"incremental decoding applies to CS and CC, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        k = self._masked_keys(k, key_padding_mask)
        real = torch.full((k.shape[0],), k.shape[-2], dtype=torch.long, device=k.device) if key_padding_mask is None \
            else (~key_padding_mask.bool()).sum(dim=-1).to(k.device)
        gram = k.transpose(-1, -2) @ v
        if self.cross:
            gram = torch.softmax(softmax_scale(k.shape[-1]) * gram, dim=-1)
        return ChannelState(gram, real)

    def decode_step(self, state, q, k=None, v=None):
        dtype = compute_dtype(q.dtype)
        check_step_inputs(self, k, v)
        if self.cross:
            attn, new = state.gram, state
        else:
            k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
            new = ChannelState(state.gram + k.transpose(-1, -2) @ v, state.real + 1)
            attn = torch.softmax(softmax_scale(q.shape[-1]) * new.gram, dim=-1)
        out = q.to(dtype) @ attn.transpose(-1, -2)
        out = torch.where((new.real > 0)[:, None, None, None], out, torch.zeros_like(out))
        return out.to(q.dtype), new
