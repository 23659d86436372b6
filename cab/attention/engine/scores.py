"""Shared machinery of the score-function attentions (softmax replacements and score variants): attentions whose
output row i is  sum_j w_ij v_j  with the weights w_i. a function of row i's own scores alone.

`RowwiseScoreAttention` computes them in query blocks of `chunk_size` rows: each block scores only the
keys it can see (causal self: keys up to the block's last row), turns the (B, H, C, Lk) score block
into weights with the subclass's `row_weights`, and multiplies by V. No L x L tensor is held: the peak is
one block, and when gradients are needed each block is checkpointed so the backward recomputes it
instead of storing it (O(C L) memory in forward and backward). The naive `reference()` is a per-row
loop over each row's visible key indices calling the subclass's independently written `reference_row` (and
`reference_values`, never the forward's `prepare_values`).
Incremental decoding (CS, CC) runs the same row function on the cached keys (`KVCache`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.kv_cache import KVCacheAttention
from cab.attention.engine.masks import query_offset
from cab.attention.engine.prepare import compute_dtype, grouped_compute, set_positive, softmax_scale, zero_empty_rows
from cab.patterns import Pattern


def dense_matmul_flops(batch: int, heads: int, lq: int, lk: int, dk: int, dv: int) -> int:
    """FLOPs of QK^T and PV over the full Lq x Lk score matrix."""
    return 2 * batch * heads * lq * lk * (dk + dv)


def masked_softmax_attention(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None",
    segment_ids: "torch.Tensor | None" = None,
) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + M) V with the full score matrix materialised (M also masks other segments
    when segment_ids is given)."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    mask, empty = attn.visible(q.shape[-2], k.shape[-2], key_padding_mask, q.device, segment_ids)
    scores = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return zero_empty_rows(torch.softmax(scores, dim=-1) @ v, empty)



def masked_softmax_rows(s, ok, vg):
    """Softmax of the scores `s` over the slots where `ok`, times `vg`: (out, lse); rows with none give 0."""
    s = s.masked_fill(~ok, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    empty = torch.isinf(mx)
    mx = torch.where(empty, torch.zeros_like(mx), mx)
    e = torch.exp(s - mx)  # exactly 0 on invalid slots
    den = e.sum(-1, keepdim=True)
    safe = torch.where(empty, torch.ones_like(den), den)
    lse = torch.where(empty, torch.full_like(mx, float("-inf")), mx + torch.log(safe))[..., 0]
    return (e @ vg) / safe, lse


def masked_softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """Row by row: softmax over the allowed keys (allowed (B, H, Lq, Lk) bool), rows with none give 0."""
    b, h, lq, _ = q.shape
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                keys = allowed[bi, hi, i].nonzero().flatten()
                if keys.numel() == 0:
                    continue
                w = torch.softmax((k[bi, hi, keys] @ q[bi, hi, i]) * scale, dim=0)
                out[bi, hi, i] = w @ v[bi, hi, keys]
    return out


def visible_keys(pattern: Pattern, lq: int, lk: int, key_padding_mask: "torch.Tensor | None", b: int,
                 i: int) -> "list[int]":
    """The key indices query row i of batch element b sees (the pattern, CS bottom-right aligned, and the
    padding): the per-row references' index list."""
    last = min(lk, i + lk - lq + 1) if pattern is Pattern.CS else lk
    return [j for j in range(last) if key_padding_mask is None or not bool(key_padding_mask[b, j])]


def reference_rows(pattern: Pattern, q: torch.Tensor, lk: int, dv: int, key_padding_mask: "torch.Tensor | None",
                   row: "Callable[[int, int, torch.Tensor], torch.Tensor]") -> torch.Tensor:
    """The per-row references' loop: (B, H, Lq, dv) whose row i of batch element b is `row(b, i, idx)`, the
    (H, dv) output of query row i over its visible keys idx (`visible_keys` as an index tensor); a row that
    sees no key outputs 0."""
    batch, heads, lq = q.shape[:3]
    rows = []
    for b in range(batch):
        per_row = []
        for i in range(lq):
            keys = visible_keys(pattern, lq, lk, key_padding_mask, b, i)
            if not keys:
                per_row.append(q.new_zeros(heads, dv))
                continue
            per_row.append(row(b, i, torch.tensor(keys, device=q.device)))
        rows.append(torch.stack(per_row, dim=1))
    return torch.stack(rows)


def block_visibility(pattern: Pattern, qs: int, qe: int, kend: int, offset: int,
                     key_ok: "torch.Tensor | None", device: torch.device) -> torch.Tensor:
    """(B or 1, 1, qe - qs, kend) bool visibility of query rows qs..qe-1 over keys 0..kend-1: causal self
    sees key j iff j <= i + offset (bottom-right alignment), and padded keys are never visible."""
    visible = torch.ones(1, 1, qe - qs, kend, dtype=torch.bool, device=device)
    if pattern is Pattern.CS:
        rows = torch.arange(qs, qe, device=device).unsqueeze(1) + offset
        visible = (torch.arange(kend, device=device).unsqueeze(0) <= rows)[None, None]
    if key_ok is not None:
        visible = visible & key_ok[:, None, None, :kend]
    return visible


def blocked_inputs(
    pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: "torch.Tensor | None"
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int, torch.dtype]":
    """(q, k, v, key_ok, offset, out_dtype) for `blocked_rows`: the inputs as `grouped_compute` gives them,
    key_ok (B, Lk) bool (True = real) or None, the CS offset Lk - Lq (else 0) and the output dtype."""
    q, k, v, out_dtype = grouped_compute(q, k, v)
    offset = query_offset(pattern, q.shape[-2], k.shape[-2])
    key_ok = None if key_padding_mask is None else ~key_padding_mask.to(device=q.device, dtype=torch.bool)
    return q, k, v, key_ok, offset, out_dtype


def cached_block(block: Callable, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 real: "torch.Tensor | None", *extra: torch.Tensor) -> torch.Tensor:
    """A decoding step of a `blocked_rows` attention: `block(q, keys, values, visible, *extra)` of the step's
    query q (B, H, 1, D) over the cached keys and values (already expanded to the query heads and in the
    compute dtype), visible from the cache's real (B, n) (None: all real); a row that sees no real key
    outputs 0. Returned in q's dtype."""
    visible = torch.ones(1, 1, 1, keys.shape[-2], dtype=torch.bool, device=q.device)
    if real is not None:
        visible = real[:, None, None, :]
    out = block(q.to(keys.dtype), keys, values, visible, *extra)
    return torch.where(visible.any(dim=-1, keepdim=True), out, torch.zeros_like(out)).to(q.dtype)


def blocked_rows(block: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                 key_ok: "torch.Tensor | None", offset: int, chunk_size: int, checkpointed: bool,
                 extra: "Callable[[int, int, int], tuple] | None" = None) -> torch.Tensor:
    """`block(q rows, their visible keys, values, visibility, *extra(qs, qe, kend))` over query blocks of
    `chunk_size` rows qs..qe-1, each against keys 0..kend-1 (causal self: up to the block's last row),
    concatenated; rows that see no key output 0. With `checkpointed`, each block is recomputed in the
    backward instead of stored (O(chunk x Lk) memory in forward and backward)."""
    lq, lk = q.shape[-2], k.shape[-2]
    outputs = []
    for qs in range(0, lq, chunk_size):
        qe = min(lq, qs + chunk_size)
        kend = min(lk, qe + offset) if pattern is Pattern.CS else lk
        if kend <= 0:
            outputs.append(q.new_zeros(*q.shape[:2], qe - qs, v.shape[-1]))
            continue
        visible = block_visibility(pattern, qs, qe, kend, offset, key_ok, q.device)
        args = (q[..., qs:qe, :], k[..., :kend, :], v[..., :kend, :], visible) + (extra(qs, qe, kend) if extra else ())
        out = checkpoint(block, *args, use_reentrant=False) if checkpointed else block(*args)
        outputs.append(torch.where(visible.any(dim=-1, keepdim=True), out, torch.zeros_like(out)))
    return torch.cat(outputs, dim=-2) if len(outputs) > 1 else outputs[0]


class RowwiseScoreAttention(KVCacheAttention):
    """Base of the attentions whose weights of row i depend only on row i's scores s_ij = q_i.k_j / sqrt(d)
    over its visible keys (their number n_i and, for some, the query q_i itself).

    Subclasses define `row_weights(scores, visible, count, q)`: scores (B, H, R, n) already scaled,
    visible (B|1, 1, R, n) bool, count (B|1, 1, R, 1) the number of visible keys of each row (>= 1: rows
    that see nothing are opened up and zeroed afterwards), q (B, H, R, D) the rows' queries; it returns
    weights that are exactly 0 on invisible keys. And `reference_row(scores, q)`: the same weights written
    plainly for one row's (H, n) scores over its n visible keys. Optional hooks: `prepare_values(v)`
    (per-key value transforms of the forward) with `reference_values(v)` (the same transform written
    plainly, key by key, for the reference) and `extra_flops`.
    """

    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, chunk_size: int = 256):
        super().__init__(pattern, num_heads, head_dim)
        set_positive(self, chunk_size=chunk_size)

    # subclass hooks --------------------------------------------------------------------------------

    def row_weights(self, scores: torch.Tensor, visible: torch.Tensor, count: torch.Tensor,
                    q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reference_row(self, scores: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare_values(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def reference_values(self, v: torch.Tensor) -> torch.Tensor:
        """The values (H, n, Dv) of one row's visible keys as the weights apply to them (`prepare_values`
        written independently, so that a bug in it is not shared by the reference)."""
        return v

    def param(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return getattr(self, name).to(dtype)

    # the efficient form ----------------------------------------------------------------------------

    def _block(self, q, k, v, visible):
        opened = visible | ~visible.any(dim=-1, keepdim=True)
        count = opened.sum(dim=-1, keepdim=True).to(q.dtype)
        scores = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])
        weights = self.row_weights(scores, opened, count, q)
        return weights @ v

    def _attend(self, q, k, v, key_ok, offset: int) -> torch.Tensor:
        """Blocked attention of q (B, H, Lq, D) over k, v (B, H, Lk, D); key_ok (B, Lk) or None."""
        use_ckpt = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v))
                                                or any(p.requires_grad for p in self.parameters()))
        return blocked_rows(self._block, q, k, v, self.pattern, key_ok, offset, self.chunk_size, use_ckpt)

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_ok, offset, out_dtype = blocked_inputs(self.pattern, q, k, v, key_padding_mask)
        return self._attend(q, k, self.prepare_values(v), key_ok, offset).to(out_dtype)

    # the naive form --------------------------------------------------------------------------------

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row: the indices of the keys row i sees (pattern and padding), its scores over them,
        `reference_row`'s weights, times `reference_values` of those values; a row that sees no key outputs 0."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])

        def row(b, i, index):
            scores = (k[b][:, index] @ q[b, :, i].unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])  # (H, n)
            weights = self.reference_row(scores, q[b, :, i])
            return (weights.unsqueeze(-2) @ self.reference_values(v[b][:, index])).squeeze(-2)

        return reference_rows(self.pattern, q, k.shape[-2], v.shape[-1], key_padding_mask, row)

    # costs and decoding ------------------------------------------------------------------------------

    def extra_flops(self, batch: int, lq: int, lk: int) -> int:
        """Matmul FLOPs beyond the score and value products (e.g. a learned projection of the queries)."""
        return 0

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """QK^T and WV over each query block's keys (causal self: up to the block's last row)."""
        total, offset = 0, (query_offset(self.pattern, lq, lk))
        for qs in range(0, lq, self.chunk_size):
            qe = min(lq, qs + self.chunk_size)
            kend = min(lk, qe + offset) if self.pattern is Pattern.CS else lk
            if kend > 0:
                total += 2 * batch * self.num_heads * (qe - qs) * kend * 2 * self.head_dim
        return total + self.extra_flops(batch, lq, lk)

    def peak_memory_estimate(self, batch, lq, lk, kv_heads, mode, dtype):
        """Score-sized blocks (B, H, C, Lk) in the compute dtype — the scores, the weight function's
        intermediates, the mask — plus repeated keys and values and the output; the backward recomputes one
        checkpointed block at a time and holds its intermediates and their gradients. Calibrated on cab's
        CPU memory probe (softplus_attention, L = 256, one block: 4.5 blocks in fwd, 10 in fwdbwd), with
        margin."""
        item = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        block = batch * self.num_heads * min(lq, self.chunk_size) * lk * item
        rows = 4 * batch * self.num_heads * max(lq, lk) * self.head_dim * item
        factor = 14 if mode in ("bwd", "fwdbwd") else 6
        return int(factor * block + 4 * rows)

    def attend_cached(self, q, keys, values, real):
        _, keys, values, _ = grouped_compute(q, keys, values)
        return cached_block(self._block, q, keys, self.prepare_values(values), real)
