"""Multi-Token Attention (MTA): a learned 2-D convolution over the (query, key) score map before the softmax,
so nearby queries and keys shape each other's weights, and a learned mixing of the weights of small
groups of heads after it. Dense O(L^2 c_q c_k); computed in query blocks (no L x L tensor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import compute_dtype, grouped_compute, softmax_scale
from cab.attention.engine.scores import block_visibility, visible_keys
from cab.patterns import Pattern
from cab.registry import register_attention

_KEY_TILE = 32  # output keys per tile of the float64 convolution's banded matrix


def _depthwise_conv(scores: torch.Tensor, kernel: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """The per-head convolution of scores (B, H, R', K) zero-padded by `top` rows above and `left` / c_k - 1 -
    left keys around, with kernel (H, 1, c_q, c_k): (B, H, R' + top - c_q + 1, K), as F.conv2d(padded, kernel,
    groups=H). Float64 (oneDNN has no float64 kernel; torch's fallback runs an im2col per sample and group,
    ~10x slower) as one matmul per head: tiles of `_KEY_TILE` output keys, each reading its c_q rows x
    (tile + c_k - 1) inputs, times the kernel's banded (Toeplitz) matrix. Other dtypes: oneDNN on the padded
    scores laid out channels-last (padded and transposed in one copy), about 3x faster for a depthwise conv."""
    pad = (left, kernel.shape[-1] - 1 - left, top, 0)
    if scores.dtype != torch.float64:
        padded = F.pad(scores.permute(0, 2, 3, 1), (0, 0, *pad)).permute(0, 3, 1, 2)  # channels-last strides
        return F.conv2d(padded, kernel, groups=scores.shape[1]).contiguous()
    x = F.pad(scores, pad)
    b, h, rows, cols = x.shape
    cq, ck = kernel.shape[-2:]
    r, k = rows - cq + 1, cols - ck + 1
    tile = min(_KEY_TILE, k)
    tiles = -(-k // tile)
    width = tile + ck - 1
    windows = F.pad(x, (0, tiles * tile - k)).unfold(-2, cq, 1).unfold(-2, width, tile)  # (B, H, R, T, cq, width)
    shift = torch.arange(width, device=x.device)[:, None] - torch.arange(tile, device=x.device)[None, :]
    band = kernel[:, 0][:, :, shift.clamp(0, ck - 1)]  # (H, cq, width, tile): kernel[h, a, m - j] on the band
    band = torch.where((shift >= 0) & (shift < ck), band, torch.zeros_like(band))
    out = windows.reshape(b, h, r * tiles, cq * width) @ band.reshape(h, cq * width, tile)
    return out.reshape(b, h, r, tiles * tile)[..., :k]


@register_attention(
    "multi_token_attention", patterns=("NS", "CS", "NC", "CC"), family="softmax-variant", exact=False,
    mechanism="M57",
    citation="Golovneva, Wang, Weston & Sukhbaatar, Multi-Token Attention, arXiv 2504.00927 (2025)",
)
class MultiTokenAttention(Attention):
    """Key-query convolution and head mixing (MTA, paper Sec. 3.1-3.2), per head h:

        S0_ij  = s_ij = q_i.k_j / sqrt(d)  if key j is visible to query i, else 0         (Mask_0)
        C_ij   = sum_{a < c_q} sum_{b < c_k} W_h[a, b] * S0[i - (c_q - 1) + a, j - floor(c_k / 2) + b]
        A_ij   = softmax_j(C_ij over the keys visible to query i)                          (Mask_-inf)
        A'_h   = sum_{h' in group(h)} M_g[h, h'] A_h'      (groups of `head_group` consecutive heads)
        o_i    = sum_j A'_ij v_j

    out-of-range S0 entries are 0. The query axis of the kernel reaches only the c_q - 1 *previous*
    queries (the paper's causal kernel) and the key axis is centred (floor(c_k/2) keys before, the rest
    after). Causality (CS): the conv mixes only scores that are themselves visible — S0[i', j'] with
    i' <= i and j' <= i' + offset <= i + offset — and the result is masked again, so row i sees no
    future key and no future query (the masking before the conv is per the score's own query row, as in
    the paper's implementation; the paper's formula masks with the output row, which would admit keys
    between i' and i). Causal cross (CC): the query kernel looks only backwards, so row i depends on
    queries <= i. Noncausal patterns use the same kernel geometry. Key padding: padded keys' scores are
    zeroed before the conv and masked after, so a padded key is never seen; a trailing pad is the same as
    the conv's zero boundary. In the self patterns a padded position is also a padded query (its q is
    garbage; query i sits at key position i + Lk - Lq under CS, NS only with Lq == Lk): Mask_0 zeroes
    that query's whole score row, so it is an absent (zero) row for the query taps of the rows after it,
    wherever the padding is (left, interior or right; a right pad follows every real row and changes
    nothing). The padded row's own output is unconstrained (a softmax over its visible keys).

    Paper defaults: c_q = 6, c_k = 11, head groups of 2. [EJ] The group normalisation the paper applies to
    each head's output (with depth-dependent scaling) belongs to the layer around the operator and is not
    included. The paper initialises the kernel to the identity (a delta at the current query and key) and
    the head mixing to the identity, where MTA is softmax attention; we add N(0, `init_std`^2) noise from a
    torch.Generator seeded with `seed` so that the convolution is exercised from the first call (0
    recovers the paper's init). Efficient form: query blocks of `chunk_size` rows, each with its c_q - 1
    halo rows, scored only against the keys the block can see, convolved with one grouped conv2d,
    checkpointed in training. No incremental decoding: a step needs the previous c_q - 1 queries' score
    rows, and the decode API's prefill carries only keys and values. Differentiable everywhere.
    """

    mixes_heads = True  # head-group mixing of the attention maps

    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, query_kernel: int = 6, key_kernel: int = 11,
                 head_group: int = 2, init_std: float = 0.02, seed: int = 0, chunk_size: int = 128):
        super().__init__(pattern, num_heads, head_dim)
        if query_kernel < 1 or key_kernel < 1 or head_group < 1 or chunk_size < 1:
            raise ValueError("query_kernel, key_kernel, head_group and chunk_size must be positive")
        if num_heads % head_group:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of head_group ({head_group})")
        self.query_kernel, self.key_kernel, self.head_group = query_kernel, key_kernel, head_group
        self.seed, self.chunk_size = seed, chunk_size
        generator = torch.Generator().manual_seed(seed)
        kernel = torch.zeros(num_heads, 1, query_kernel, key_kernel, dtype=torch.float64)
        kernel[:, 0, query_kernel - 1, key_kernel // 2] = 1.0
        kernel += init_std * torch.randn(kernel.shape, generator=generator, dtype=torch.float64)
        mixing = torch.eye(head_group, dtype=torch.float64).repeat(num_heads // head_group, 1, 1)
        mixing += init_std * torch.randn(mixing.shape, generator=generator, dtype=torch.float64)
        self.kernel = nn.Parameter(kernel.to(torch.get_default_dtype()))
        self.mixing = nn.Parameter(mixing.to(torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, query_kernel={self.query_kernel}, key_kernel={self.key_kernel}, "
                f"head_group={self.head_group}")

    def _mix(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, H, R, K) weights -> the head-mixed weights, within groups of `head_group` heads."""
        b, h, r, k = weights.shape
        g = self.head_group
        mixing = self.mixing.to(weights.dtype)
        grouped = weights.reshape(b, h // g, g, r * k)
        return (mixing.unsqueeze(0) @ grouped).reshape(b, h, r, k)

    def _block(self, q_ext, k, v, scored, visible, top: int):
        """q_ext: the block's rows with their halo rows above; scored (B|1, 1, halo + R, K): the scores kept
        before the conv (Mask_0); visible (B|1, 1, R, K): the keys each of the block's R rows attends."""
        scores = (q_ext @ k.transpose(-1, -2)) * softmax_scale(q_ext.shape[-1])
        scores = scores.masked_fill(~scored, 0.0)
        conv = _depthwise_conv(scores, self.kernel.to(scores.dtype), top, self.key_kernel // 2)  # (B, H, R, K)
        opened = visible | ~visible.any(dim=-1, keepdim=True)
        weights = torch.softmax(conv.masked_fill(~opened, float("-inf")), dim=-1)
        return self._mix(weights) @ v

    def _query_padding(self, key_padding_mask, lq: int, lk: int) -> "torch.Tensor | None":
        """(B, Lq) bool, self patterns only: the query rows at padded positions (query i sits at key position
        i + Lk - Lq under CS; NS only with Lq == Lk; rows at positions before the first key count as real,
        they see no key). None for the cross patterns (their queries are never padded), for NS with
        Lq != Lk (no query-key correspondence) and without a mask."""
        if key_padding_mask is None or self.pattern.cross or (self.pattern is Pattern.NS and lq != lk):
            return None
        pad = key_padding_mask.to(dtype=torch.bool)
        positions = torch.arange(lq, device=pad.device) + (lk - lq)
        inside = (positions >= 0) & (positions < lk)
        return pad[:, positions.clamp(0, max(lk - 1, 0))] & inside

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, out_dtype = grouped_compute(q, k, v)
        lq, lk = q.shape[-2], k.shape[-2]
        causal = self.pattern is Pattern.CS
        offset = lk - lq if causal else 0
        key_ok = None if key_padding_mask is None else ~key_padding_mask.to(device=q.device, dtype=torch.bool)
        query_pad = self._query_padding(None if key_ok is None else ~key_ok, lq, lk)
        use_ckpt = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v))
                                                or any(p.requires_grad for p in self.parameters()))
        outputs = []
        for qs in range(0, lq, self.chunk_size):
            qe = min(lq, qs + self.chunk_size)
            kend = min(lk, qe + offset) if causal else lk
            if kend <= 0:
                outputs.append(q.new_zeros(*q.shape[:2], qe - qs, v.shape[-1]))
                continue
            rs = max(0, qs - (self.query_kernel - 1))
            halo = qs - rs
            visible_ext = block_visibility(self.pattern, rs, qe, kend, offset, key_ok, q.device)
            # Mask_0 also zeroes the score rows of padded queries (self patterns): their garbage q never
            # reaches a later row through the query taps; the softmax mask (`visible`) stays per key
            scored = visible_ext if query_pad is None else visible_ext & ~query_pad[:, None, rs:qe, None]
            args = (q[..., rs:qe, :], k[..., :kend, :], v[..., :kend, :], scored, visible_ext[..., halo:, :],
                    self.query_kernel - 1 - halo)
            out = checkpoint(self._block, *args, use_reentrant=False) if use_ckpt else self._block(*args)
            seen = visible_ext[..., halo:, :].any(dim=-1, keepdim=True)
            outputs.append(torch.where(seen, out, torch.zeros_like(out)))
        out = torch.cat(outputs, dim=-2) if len(outputs) > 1 else outputs[0]
        return out.to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row: the c_q score rows ending at row i (Mask_0 per their own visibility, zero rows before
        the start and, in self patterns, for padded queries), each key's logit as the kernel-weighted sum of
        its c_q x c_k window (zeros outside), softmax over the visible keys, then the explicit head-mixing
        sum."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        batch, heads, lq, dim = q.shape
        lk = k.shape[-2]
        cq, ck, g = self.query_kernel, self.key_kernel, self.head_group

        def row_keys(b, i):
            return visible_keys(self.pattern, lq, lk, key_padding_mask, b, i)

        def query_padded(b, i):  # self patterns: query i sits at key position i + Lk - Lq (NS: Lq == Lk only)
            if key_padding_mask is None or self.pattern.cross or (self.pattern is Pattern.NS and lq != lk):
                return False
            position = i + lk - lq
            return 0 <= position < lk and bool(key_padding_mask[b, position])

        rows = []
        for b in range(batch):
            per_row = []
            for i in range(lq):
                keys = row_keys(b, i)
                if not keys:
                    per_row.append(q.new_zeros(heads, v.shape[-1]))
                    continue
                s0 = q.new_zeros(heads, cq, lk)
                for a in range(cq):
                    row = i - (cq - 1) + a
                    if row >= 0 and not query_padded(b, row):
                        idx = torch.tensor(row_keys(b, row), dtype=torch.long)
                        if len(idx):
                            s0[:, a, idx] = (q[b, :, row].unsqueeze(1) * k[b][:, idx]).sum(-1) / dim**0.5
                # every key's window of c_k scores in each of the c_q rows: (H, c_q, Lk, c_k)
                left = ck // 2
                windows = torch.cat([s0.new_zeros(heads, cq, left), s0, s0.new_zeros(heads, cq, ck - 1 - left)],
                                    dim=-1).unfold(-1, ck, 1)
                logits = (windows * self.kernel[:, 0, :, None, :]).sum(dim=(1, 3))[:, keys]  # (H, n)
                weights = torch.softmax(logits, dim=-1)  # (H, n)
                mixed = torch.stack([sum(self.mixing[h // g, h % g, m] * weights[(h // g) * g + m] for m in range(g))
                                     for h in range(heads)])
                per_row.append((mixed.unsqueeze(1) @ v[b][:, torch.tensor(keys)]).squeeze(1))
            rows.append(torch.stack(per_row, dim=1))
        return torch.stack(rows)

    def peak_memory_estimate(self, batch, lq, lk, kv_heads, mode, dtype):
        """(B, H, C + c_q - 1, Lk + c_k - 1) score blocks in the compute dtype (scores, padded copy, conv
        output, softmax, head-mixed weights, masks), plus repeated keys, values and the output; the backward
        recomputes one checkpointed block at a time. Calibrated on cab's CPU memory probe (L = 256, one
        block: 9.5 blocks in fwd, 11.5 in fwdbwd; L = 512: 12.5 in fwd), with margin."""
        item = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        block = batch * self.num_heads * (min(lq, self.chunk_size) + self.query_kernel) * (lk + self.key_kernel) * item
        rows = 4 * batch * self.num_heads * max(lq, lk) * self.head_dim * item
        return int((22 if mode in ("bwd", "fwdbwd") else 18) * block + 6 * rows)
