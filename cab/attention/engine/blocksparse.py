"""Shared block-sparse engine of the static sparse / local attentions (private: the registry skips it).

A static pattern is described twice, at two granularities, by the attention that owns it:

* `mask_fn(b, h, i, j) -> bool tensor`: element visibility of key j to query row i for batch element b and
  head h (int64 index tensors that broadcast against each other; the pattern only, key padding is added
  here; b matters only for patterns whose extent follows the real keys of each element). It must use
  tensor ops only (no Python branching on values), so the same function is FlexAttention's mask_mod.
* a `Layout`: per query block (and per head when the pattern differs between heads) the list of key blocks
  that hold at least one visible pair; it must cover the element mask (`check_layout_covers` tests that).

From those, three implementations of one attention:

* `blocksparse_attention` (the torch training path): for every query block the listed key blocks are
  gathered into one dense tile (query blocks grouped by how many key blocks they list, so nothing is padded),
  scored with batched matmuls, masked at element level, normalised (softmax, or an unnormalised sigmoid) and
  applied to the gathered values. Autograd gives the backward (the gathers' backward is a scatter-add).
  Memory and time O(sum over query blocks of rows x listed keys), never Lq x Lk.
* the FlexAttention path (`backend="flex"`, `flex_block_mask`): the same layout (rebuilt at FlexAttention's
  block size) as a `BlockMask` with the mask as mask_mod, run by cab's compiled FlexAttention call
  (`cab.attention.flash`); softmax only. On CPU FlexAttention has no backward, so with gradients the
  backward is autograd through the torch path's recomputation (exact, but not a FlexAttention kernel); on
  CUDA it is FlexAttention's own.
* `dense_reference`: the obviously correct form: the full (H, Lq, Lk) mask from `mask_fn`, padding,
  eager softmax (or sigmoid) over it.

Counting: `layout_pairs` counts the (batch, head, real query, real key) pairs inside the listed blocks —
what the block-sparse forward scores (masked entries inside a listed block included, as every block-sparse
kernel computes them); `layout_matmul_flops` is the torch path's matmul FLOPs as torch's FlopCounterMode
counts them (including the zero rows that pad the last query and key block).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import softmax_scale

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("torch", "flex")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Block structure of a sparse pattern. kv_idx (Hm, nQ, maxK) int64 key-block indices (entries past
    kv_num are ignored; no repeats within a row), kv_num (Hm, nQ) int64; Hm is 1 (every head the same) or
    the number of query heads."""

    block_q: int
    block_k: int
    lq: int
    lk: int
    kv_idx: torch.Tensor
    kv_num: torch.Tensor

    @property
    def num_q_blocks(self) -> int:
        return -(-self.lq // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.lk // self.block_k)

    def block_mask(self) -> torch.Tensor:
        """(Hm, nQ, nK) bool: which key blocks each query block lists."""
        hm, nq, maxk = self.kv_idx.shape
        out = torch.zeros(hm, nq, self.num_k_blocks + 1, dtype=torch.bool)
        slot = torch.arange(maxk) < self.kv_num[..., None]
        idx = torch.where(slot, self.kv_idx, torch.full_like(self.kv_idx, self.num_k_blocks))
        out.scatter_(-1, idx, True)
        return out[..., :-1]


def layout_from_block_mask(blocks: torch.Tensor, block_q: int, block_k: int, lq: int, lk: int) -> Layout:
    """A Layout from a (Hm, nQ, nK) bool block mask (rows listed in increasing key-block order)."""
    blocks = blocks.bool()
    num = blocks.sum(-1)
    maxk = max(1, int(num.max())) if blocks.numel() else 1
    # stable sort puts the listed blocks first, in increasing order
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices[..., :maxk]
    return Layout(block_q, block_k, lq, lk, order.contiguous(), num.to(torch.int64))


def layout_from_intervals(lo: torch.Tensor, hi: torch.Tensor, block_q: int, block_k: int, lq: int, lk: int,
                          extra_keys: int = 0) -> Layout:
    """A Layout from per-query-row visible key intervals [lo, hi] (inclusive; (Hm, Lq) or (Lq,) int64; an
    empty row has hi < lo) plus the first `extra_keys` keys (sinks) for every query block. O(Lq) work."""
    if lo.dim() == 1:
        lo, hi = lo[None], hi[None]
    hm = lo.shape[0]
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    pad = nq * block_q - lq
    empty = hi < lo
    big = torch.iinfo(torch.int64).max // 4
    lo_ = torch.nn.functional.pad(torch.where(empty, big, lo.clamp(0, max(lk - 1, 0))), (0, pad), value=big)
    hi_ = torch.nn.functional.pad(torch.where(empty, -1, hi.clamp(-1, lk - 1)), (0, pad), value=-1)
    first = lo_.view(hm, nq, block_q).min(-1).values
    last = hi_.view(hm, nq, block_q).max(-1).values
    kb = torch.arange(nk)
    blocks = ((kb * block_k + block_k - 1) >= first[..., None]) & ((kb * block_k) <= last[..., None])
    blocks &= (last >= first)[..., None]
    if extra_keys > 0:
        blocks |= (kb * block_k < min(extra_keys, lk))[None, None]
    return layout_from_block_mask(blocks, block_q, block_k, lq, lk)


def layout_from_boxes(boxes: "list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]", width: int,
                      block_q: int, block_k: int, lq: int, lk: int, extra_keys: int = 0) -> Layout:
    """A Layout from per-query boxes on a row-major grid of `width` columns: each box (r_lo, r_hi, c_lo, c_hi)
    ((Hm, Lq) or (Lq,) int64, inclusive; empty when hi < lo) covers keys row * width + col for rows in
    [r_lo, r_hi] and cols in [c_lo, c_hi]; a 1-D interval [lo, hi] is the box (0, 0, lo, hi) with
    width >= Lk. The union of the boxes (plus the first `extra_keys` keys) must cover the query's visible
    keys. Exact at block level for the boxes: O(Lq x box rows) scatter work, no Lq x Lk evaluation."""
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    boxes = [tuple(t if t.dim() == 2 else t[None] for t in box) for box in boxes]
    hm = max(t.shape[0] for box in boxes for t in box)
    diff = torch.zeros(hm, nq, nk + 2, dtype=torch.int64)
    qb = (torch.arange(lq) // block_q)[None].expand(hm, lq)
    for r_lo, r_hi, c_lo, c_hi in boxes:
        r_lo, r_hi, c_lo, c_hi = (t.expand(hm, lq) for t in (r_lo, r_hi, c_lo, c_hi))
        c_lo, c_hi = c_lo.clamp(min=0), c_hi.clamp(max=width - 1)
        r_lo = r_lo.clamp(min=0)
        rows = int((r_hi - r_lo + 1).clamp(min=0).max()) if lq else 0
        for rr in range(rows):
            row = r_lo + rr
            start, end = row * width + c_lo, (row * width + c_hi).clamp(max=lk - 1)
            ok = (row <= r_hi) & (c_lo <= c_hi) & (start <= end) & (start < lk)
            sb = torch.where(ok, start // block_k, nk + 1)
            eb = torch.where(ok, end // block_k + 1, nk + 1)
            flat = diff.view(hm, -1)
            flat.scatter_add_(-1, qb * (nk + 2) + sb, ok.to(torch.int64))
            flat.scatter_add_(-1, qb * (nk + 2) + eb, -ok.to(torch.int64))
    blocks = diff.cumsum(-1)[..., :nk] > 0
    if extra_keys > 0:
        blocks |= (torch.arange(nk) * block_k < min(extra_keys, lk))[None, None]
    return layout_from_block_mask(blocks, block_q, block_k, lq, lk)


def layout_by_evaluation(mask_fn: MaskFn, heads: int, block_q: int, block_k: int, lq: int, lk: int,
                         rows_per_step: int = 0, batch: int = 1) -> Layout:
    """A Layout found by evaluating the element mask (any() per block pair, union over b < batch), a chunk of
    query rows at a time: exact for any pattern, O(batch Hm Lq Lk) boolean work once per shape (callers
    cache it) and O(chunk Lk) memory. `heads` is Hm (1 when the mask ignores h)."""
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    h = torch.arange(heads)[:, None, None]
    j = torch.arange(nk * block_k)
    real_j = j < lk
    blocks = torch.zeros(heads, nq, nk, dtype=torch.bool)
    step = max(1, rows_per_step or (1 << 21) // max(1, heads * nk * block_k * block_q)) * block_q
    for b in range(batch):
        bb = torch.tensor(b)
        for start in range(0, nq * block_q, step):
            i = torch.arange(start, min(start + step, nq * block_q))
            vis = mask_fn(bb, h, i[:, None].clamp(max=lq - 1), j[None, :].clamp(max=lk - 1))
            vis = vis.expand(heads, len(i), len(j)) & real_j & (i < lq)[:, None]
            rows = vis.view(heads, len(i) // block_q, block_q, nk, block_k).any(-1).any(2)
            blocks[:, start // block_q: start // block_q + rows.shape[1]] |= rows
    return layout_from_block_mask(blocks, block_q, block_k, lq, lk)


def check_layout_covers(layout: Layout, mask_fn: MaskFn, heads: int, batch: int = 1) -> bool:
    """Whether every visible element of the mask lies in a listed block (a test helper; dense)."""
    dense = dense_mask(mask_fn, heads, layout.lq, layout.lk, batch=batch).any(0)
    blocks = layout.block_mask()
    up = blocks.repeat_interleave(layout.block_q, 1).repeat_interleave(layout.block_k, 2)
    up = up[:, :layout.lq, :layout.lk]
    return bool((~dense | up).all())


def dense_mask(mask_fn: MaskFn, heads: int, lq: int, lk: int, device=None, batch: int = 1) -> torch.Tensor:
    """(batch, Hm, Lq, Lk) bool element mask."""
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(heads, device=device)[None, :, None, None]
    i = torch.arange(lq, device=device)[None, None, :, None]
    j = torch.arange(lk, device=device)[None, None, None, :]
    return mask_fn(b, h, i, j).expand(batch, heads, lq, lk)


# the torch path ---------------------------------------------------------------------------------------

def _groups(layout: Layout) -> "list[tuple[torch.Tensor, torch.Tensor, int]]":
    """Tasks (head-variant index, query block) grouped by their number of listed key blocks:
    [(task ids (T,), count)], task id = hm * nQ + qb. Tasks listing no block are omitted."""
    flat = layout.kv_num.reshape(-1)
    out = []
    for count in torch.unique(flat).tolist():
        if count == 0:
            continue
        out.append((torch.nonzero(flat == count).flatten(), count))
    return out


def blocksparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, mask_fn: MaskFn,
                          key_padding_mask: "torch.Tensor | None" = None, *, score_mod: "ScoreMod | None" = None,
                          normalize: str = "softmax", scale: "float | None" = None,
                          mask_cache: "dict | None" = None) -> torch.Tensor:
    """Attention over the listed blocks only. q (B, H, Lq, D), k/v (B, Hkv, Lk, D); output (B, H, Lq, Dv).
    `mask_cache`: a dict the caller keeps per (shape, extents, device) to reuse the tiles' element masks
    (the pattern part, not the padding) across calls: the pattern is static, so only the first call of a
    shape evaluates mask_fn.
    normalize="softmax": softmax over each row's visible keys (a row with none outputs 0);
    normalize="sigmoid": sum_j sigmoid(score_ij) v_j over visible keys (no normalisation).
    score_mod(scores, h, i, j) may add a bias (h, i, j broadcast index tensors as mask_fn gets them)."""
    batch, heads, lq, dim = q.shape
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    lk, dv = k.shape[-2], v.shape[-1]
    bq, bk = layout.block_q, layout.block_k
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    hm = layout.kv_idx.shape[0]
    device = q.device
    scale = softmax_scale(dim) if scale is None else scale
    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, nq * bq - lq)).view(batch, heads, nq, bq, dim)
    k_blocks = torch.nn.functional.pad(k, (0, 0, 0, nk * bk - lk)).view(batch, heads, nk, bk, dim)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, nk * bk - lk)).view(batch, heads, nk, bk, dv)
    key_ok = torch.arange(nk * bk, device=device) < lk
    key_ok = key_ok[None].expand(batch, -1)
    if key_padding_mask is not None:
        key_ok = key_ok & torch.nn.functional.pad(~key_padding_mask.to(device=device, dtype=torch.bool),
                                                  (0, nk * bk - lk), value=False)
    ok_blocks = key_ok.view(batch, nk, bk)
    kv_idx = layout.kv_idx.to(device)
    rows = torch.arange(bq, device=device)
    cols = torch.arange(bk, device=device)
    pieces, order = [], []
    for tasks, count in _groups(layout):
        tasks = tasks.to(device)
        hv, qb = tasks // nq, tasks % nq
        idx = kv_idx[hv, qb, :count]  # (T, count)
        i = qb[:, None] * bq + rows  # (T, bq)
        j = (idx[..., None] * bk + cols).flatten(1)  # (T, count * bk)
        if hm == 1:  # every head alike: keep the head axis
            qt = q_blocks[:, :, qb]  # (B, H, T, bq, D)
            kt = k_blocks[:, :, idx].flatten(3, 4)  # (B, H, T, count*bk, D)
            vt = v_blocks[:, :, idx].flatten(3, 4)
            h = torch.arange(heads, device=device)[:, None, None, None]
        else:  # one task per (head, query block): a unit head axis
            qt = q_blocks[:, hv, qb].unsqueeze(1)
            kt = k_blocks[:, hv[:, None], idx].flatten(2, 3).unsqueeze(1)
            vt = v_blocks[:, hv[:, None], idx].flatten(2, 3).unsqueeze(1)
            h = hv[None, :, None, None]
        ii, jj = i[None, :, :, None], j[None, :, None, :]
        pattern = None if mask_cache is None else mask_cache.get(count)
        if pattern is None:
            bb = torch.arange(batch, device=device)[:, None, None, None, None]
            pattern = mask_fn(bb, h[None], ii[None].clamp(max=lq - 1), jj[None].clamp(max=lk - 1))
            pattern = pattern & (ii < lq) & (jj < lk)
            if mask_cache is not None:
                mask_cache[count] = pattern
        visible = pattern
        visible = visible & ok_blocks[:, idx].flatten(2, 3)[:, None, :, None, :]  # (B, H|1, T, bq, K)
        scores = (qt @ kt.transpose(-1, -2)) * scale
        if score_mod is not None:
            scores = score_mod(scores, h, ii, jj)
        if normalize == "softmax":
            probs = torch.softmax(scores.masked_fill(~visible, torch.finfo(scores.dtype).min), dim=-1)
            probs = probs * visible.any(-1, keepdim=True)
        elif normalize == "sigmoid":
            probs = torch.sigmoid(scores) * visible
        else:
            raise ValueError(f"normalize must be 'softmax' or 'sigmoid', got {normalize!r}")
        out = probs @ vt  # (B, H|1, T, bq, Dv)
        pieces.append(out.squeeze(1).transpose(0, 1) if hm != 1 else out.movedim(2, 0))
        order.append(tasks)
    # every (head variant, query block) task: empty ones output zeros
    all_tasks = torch.cat(order) if order else torch.zeros(0, dtype=torch.long, device=device)
    missing = torch.ones(hm * nq, dtype=torch.bool, device=device)
    missing[all_tasks] = False
    missing = torch.nonzero(missing).flatten()
    if len(missing):
        shape = (len(missing), batch, heads, bq, dv) if hm == 1 else (len(missing), batch, bq, dv)
        pieces.append(q.new_zeros(shape))
        order.append(missing)
    stacked = torch.cat(pieces)  # (tasks, B, [H,] bq, Dv) in `order`
    inverse = torch.zeros(hm * nq, dtype=torch.long, device=device)
    inverse[torch.cat(order)] = torch.arange(hm * nq, device=device)
    stacked = stacked[inverse]
    if hm == 1:  # (nQ, B, H, bq, Dv)
        out = stacked.permute(1, 2, 0, 3, 4).reshape(batch, heads, nq * bq, dv)
    else:  # (H * nQ, B, bq, Dv)
        out = stacked.view(heads, nq, batch, bq, dv).permute(2, 0, 1, 3, 4).reshape(batch, heads, nq * bq, dv)
    return out[:, :, :lq]


def layout_pairs(layout: Layout, batch: int, heads: int) -> int:
    """(batch, head, real query, real key) pairs inside the listed blocks: what a block-sparse forward scores."""
    nq, nk = layout.num_q_blocks, layout.num_k_blocks
    q_rows = torch.clamp(layout.lq - torch.arange(nq) * layout.block_q, max=layout.block_q)
    k_rows = torch.clamp(layout.lk - torch.arange(nk) * layout.block_k, max=layout.block_k)
    listed = layout.block_mask().to(torch.int64)  # (Hm, nQ, nK)
    per_variant = int((q_rows[None, :, None] * listed * k_rows[None, None, :]).sum())
    repeat = heads if layout.kv_idx.shape[0] == 1 else 1
    return batch * repeat * per_variant


def layout_matmul_flops(layout: Layout, batch: int, heads: int, dk: int, dv: int) -> int:
    """Matmul FLOPs of `blocksparse_attention` (scores and values, padded tile rows included)."""
    tiles = int(layout.kv_num.sum()) * layout.block_q * layout.block_k  # per head variant
    repeat = heads if layout.kv_idx.shape[0] == 1 else 1
    return 2 * batch * repeat * tiles * (dk + dv)


# the dense reference ----------------------------------------------------------------------------------

def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_fn: MaskFn, heads_vary: bool,
                    key_padding_mask: "torch.Tensor | None" = None, *, score_mod: "ScoreMod | None" = None,
                    normalize: str = "softmax", scale: "float | None" = None) -> torch.Tensor:
    """The naive form: full score matrix, the (H, Lq, Lk) element mask and the padding, eager normalisation."""
    heads, lq, dim = q.shape[1], q.shape[2], q.shape[3]
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    lk = k.shape[-2]
    scale = softmax_scale(dim) if scale is None else scale
    mask = dense_mask(mask_fn, heads if heads_vary else 1, lq, lk, q.device, batch=q.shape[0])
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) * scale
    if score_mod is not None:
        h = torch.arange(heads, device=q.device)[:, None, None]
        i = torch.arange(lq, device=q.device)[None, :, None]
        j = torch.arange(lk, device=q.device)[None, None, :]
        scores = score_mod(scores, h, i, j)
    if normalize == "sigmoid":
        return (torch.sigmoid(scores) * mask) @ v
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0) * mask.any(-1, keepdim=True)
    return probs @ v


# the FlexAttention path --------------------------------------------------------------------------------

FLEX_BLOCK = 128


def flex_unavailable_reason(device) -> "str | None":
    from cab.attention.flash import FlexAttention

    return FlexAttention.unavailable_reason(device)


def flex_block_mask(layout: Layout, mask_fn: MaskFn, batch: int, heads: int,
                    key_padding_mask: "torch.Tensor | None", device):
    """FlexAttention BlockMask of a layout (built at FLEX_BLOCK) with mask_fn (and the padding) as mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    hm, nq, _ = layout.kv_idx.shape
    nk = layout.num_k_blocks
    idx = torch.zeros(hm, nq, nk, dtype=torch.int32)
    idx[..., :layout.kv_idx.shape[-1]] = layout.kv_idx.to(torch.int32)
    num = layout.kv_num.to(torch.int32)
    pad = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
    if pad is not None:
        from cab.attention.flash import static_batch

        pad = pad.clone()  # the mask_mod's own copy, its batch kept static (see flash.static_batch)
        static_batch(pad)
    if pad is None:
        def mask_mod(b, h, i, j):
            return mask_fn(b, h, i, j)
        bsz = batch
    else:
        def mask_mod(b, h, i, j):
            return mask_fn(b, h, i, j) & ~pad[b, j]
        bsz = batch
    return BlockMask.from_kv_blocks(
        num[None].expand(bsz, hm, nq).contiguous().to(device),
        idx[None].expand(bsz, hm, nq, nk).contiguous().to(device),
        BLOCK_SIZE=(layout.block_q, layout.block_k), mask_mod=mask_mod, seq_lengths=(layout.lq, layout.lk))


class _FlexForwardTorchBackward(torch.autograd.Function):
    """FlexAttention forward; backward by autograd through the torch block-sparse path (CPU has no flex
    backward)."""

    @staticmethod
    def forward(ctx, q, k, v, run_flex, run_torch):
        ctx.save_for_backward(q, k, v)
        ctx.run_torch = run_torch
        return run_flex(q.detach(), k.detach(), v.detach())

    @staticmethod
    def backward(ctx, dout):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = ctx.run_torch(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), dout)
        return grads[0], grads[1], grads[2], None, None


def flex_with_fallback_backward(q, k, v, run_flex, run_torch) -> torch.Tensor:
    """Run `run_flex` (FlexAttention on q, k, v). Needing gradients on CPU (FlexAttention has no CPU
    backward) or under a caller's TorchDispatchMode (torch.compile cannot run under one), the backward is
    autograd through `run_torch`'s recomputation; on CUDA otherwise FlexAttention's own backward."""
    from cab.attention.flash import in_user_dispatch_mode

    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not wants_grad:
        return run_flex(q.detach(), k.detach(), v.detach())
    if q.device.type == "cpu" or in_user_dispatch_mode():
        return _FlexForwardTorchBackward.apply(q, k, v, run_flex, run_torch)
    return run_flex(q, k, v)


class BlockSparseAttention(Attention):
    """Base of the static block-sparse attentions. A subclass provides `mask_fn(lq, lk, extent)` (the
    element mask for a shape as a function of (b, h, i, j)) and `build_layout(lq, lk, block_q, block_k,
    extents)`, sets `heads_vary` when its pattern differs between query heads and `extent_dependent` when
    its pattern depends on where the sequence ends (then `extent` is the (B,) tensor of each element's
    extent, its last real key + 1, so trailing padded keys cannot move a window, and `extents` the tuple of
    distinct extents the layout must cover; otherwise extent is None and extents is (Lk,)).
    `normalize` / `score_mod` select the normalisation and an additive score bias. forward = the torch
    block-sparse path or FlexAttention (`backend`), reference = the dense mask form, computed_pairs /
    algorithmic_flops from the layout."""

    heads_vary: bool = False
    extent_dependent: bool = False
    normalize: str = "softmax"
    block_size: int = 64  # the torch path's query and key block

    def _set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "flex" and self.normalize != "softmax":
            raise ValueError(f"{type(self).name or type(self).__name__}: backend='flex' needs softmax "
                             f"normalisation; this attention normalises by {self.normalize}")
        self.backend = backend
        self.compiles_per_shape = backend == "flex"

    # subclass hooks ---------------------------------------------------------------------------------
    def mask_fn(self, lq: int, lk: int, extent: "torch.Tensor | None" = None) -> MaskFn:
        raise NotImplementedError

    def build_layout(self, lq: int, lk: int, block_q: int, block_k: int, extents: "tuple[int, ...]") -> Layout:
        ext = torch.tensor(extents) if self.extent_dependent else None
        return layout_by_evaluation(self.mask_fn(lq, lk, ext), self.num_heads if self.heads_vary else 1,
                                    block_q, block_k, lq, lk, batch=len(extents) if self.extent_dependent else 1)

    def score_mod(self, lq: int, lk: int) -> "ScoreMod | None":
        return None

    # machinery --------------------------------------------------------------------------------------
    def extent(self, batch: int, lk: int, key_padding_mask, device) -> "torch.Tensor | None":
        """(B,) int64 extents (last real key + 1) when the pattern depends on them, else None."""
        if not self.extent_dependent:
            return None
        if key_padding_mask is None:
            return torch.full((batch,), lk, dtype=torch.int64, device=device)
        real = ~key_padding_mask.to(device=device, dtype=torch.bool)
        idx = torch.arange(1, lk + 1, device=device)
        return (real * idx).max(dim=-1).values

    def layout(self, lq: int, lk: int, block: "int | None" = None, extent: "torch.Tensor | None" = None) -> Layout:
        block = block or self.block_size
        extents = tuple(sorted(set(extent.tolist()))) if extent is not None else (lk,)
        cache = self.__dict__.setdefault("_layout_cache", {})
        key = (lq, lk, block, extents)
        if key not in cache:
            if len(cache) >= 16:
                cache.pop(next(iter(cache)))
            cache[key] = self.build_layout(lq, lk, block, block, extents)
        return cache[key]

    def _torch(self, q, k, v, key_padding_mask):
        lq, lk = q.shape[-2], k.shape[-2]
        extent = self.extent(q.shape[0], lk, key_padding_mask, q.device)
        # the tiles' element masks depend on the shape, the extents (in batch order) and the device only
        masks = self.__dict__.setdefault("_mask_cache", {})
        key = (lq, lk, q.shape[0] if extent is not None else None,
               None if extent is None else tuple(extent.tolist()), str(q.device))
        if key not in masks:
            if len(masks) >= 4:
                masks.pop(next(iter(masks)))
            masks[key] = {}
        return blocksparse_attention(q, k, v, self.layout(lq, lk, None, extent), self.mask_fn(lq, lk, extent),
                                     key_padding_mask, score_mod=self.score_mod(lq, lk), normalize=self.normalize,
                                     mask_cache=masks[key])

    def forward(self, q, k, v, key_padding_mask=None):
        if self.backend == "torch":
            return self._torch(q, k, v, key_padding_mask)
        reason = flex_unavailable_reason(q.device)
        if reason:
            raise RuntimeError(f"{type(self).name}: backend='flex' is unavailable here: {reason}")
        from cab.attention.flash import flex_call

        lq, lk = q.shape[-2], k.shape[-2]
        extent = self.extent(q.shape[0], lk, key_padding_mask, q.device)
        block_mask = self._flex_block_mask(q.shape[0], lq, lk, key_padding_mask, extent, q.device)

        def run_flex(q_, k_, v_):
            return flex_call(q_, k_, v_, block_mask)  # rows with no visible key come out as 0

        return flex_with_fallback_backward(q, k, v, run_flex, lambda a, b, c: self._torch(a, b, c, key_padding_mask))

    def _flex_block_mask(self, batch, lq, lk, key_padding_mask, extent, device):
        """The FlexAttention BlockMask, cached per shape and padding (building one is not free)."""
        pad_key = None if key_padding_mask is None else key_padding_mask.cpu().numpy().tobytes()
        key = (batch, lq, lk, str(device), pad_key)
        cache = self.__dict__.setdefault("_flex_cache", {})
        if key not in cache:
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            cache[key] = flex_block_mask(self.layout(lq, lk, FLEX_BLOCK, extent), self.mask_fn(lq, lk, extent),
                                         batch, self.num_heads, key_padding_mask, device)
        return cache[key]

    def reference(self, q, k, v, key_padding_mask=None):
        lq, lk = q.shape[-2], k.shape[-2]
        extent = self.extent(q.shape[0], lk, key_padding_mask, q.device)
        return dense_reference(q, k, v, self.mask_fn(lq, lk, extent), self.heads_vary, key_padding_mask,
                               score_mod=self.score_mod(lq, lk), normalize=self.normalize)

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Pairs inside the listed blocks (torch: this module's block size; flex: FlexAttention's 128)."""
        lk = k.shape[-2]
        extent = self.extent(q.shape[0], lk, key_padding_mask, q.device)
        block = FLEX_BLOCK if self.backend == "flex" else None
        return layout_pairs(self.layout(q.shape[-2], lk, block, extent), q.shape[0], q.shape[1])

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """The torch path's matmul FLOPs (None for flex, whose fused kernel is not counted block by block, and
        for extent-dependent patterns, whose block list follows the key padding)."""
        if self.backend != "torch" or self.extent_dependent:
            return None  # extent-dependent layouts change with the padding, which this signature lacks
        extent = None
        return layout_matmul_flops(self.layout(lq, lk, None, extent), batch, self.num_heads, self.head_dim,
                                   self.head_dim)

    def visible_mask(self, lq: int, lk: int, key_padding_mask=None, batch: int = 1) -> torch.Tensor:
        """(B, H|1, Lq, Lk) bool: the pattern's element mask (padding not applied), for tests and plots."""
        if key_padding_mask is not None:
            batch = key_padding_mask.shape[0]
        extent = self.extent(batch, lk, key_padding_mask, "cpu")
        return dense_mask(self.mask_fn(lq, lk, extent), self.num_heads if self.heads_vary else 1, lq, lk,
                          batch=batch)
