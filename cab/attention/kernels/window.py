"""Sliding-window (+ sink) exact softmax attention in Triton, flash-style, beside its PyTorch reference.

Visibility (cab's `local` convention): query i sits at position p = i + offset (offset = Lk - Lq for
causal, bottom-right; 0 otherwise) and sees key j when j is not padding and
    noncausal: |p - j| <= w,      causal: p - w <= j <= p,      or j < s (a sink; causal: also j <= p).
Rows that see no key output 0. Scores are scaled by `scale` (default 1/sqrt(d)).

Forward (one program per (batch*head, block of BLOCK_M queries)): FlashAttention-2's online softmax over
the key blocks that can hold a visible key — the sink blocks, then the blocks the window of this query
block touches; every other key block is skipped, so the work is O(L (w + s)) and no score leaves the chip.
It stores the output and the row log-sum-exp (base 2; +inf for a row with no visible key).
Backward (FlashAttention-2): delta = rowsum(dO * O) in PyTorch; one kernel per key block accumulates dK
and dV over the query blocks whose windows reach it (every query block for a block holding sinks); one
kernel per query block accumulates dQ over the same key blocks as the forward. P is recomputed from the
saved log-sum-exp. Kernels take float16, bfloat16 or float32 (fp32 accumulation).
"""

from __future__ import annotations

import torch

from cab.attention.kernels import next_power_of_2, triton_import_error

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# pure-PyTorch reference ------------------------------------------------------------------------------------

def window_mask(lq: int, lk: int, window: int, sinks: int, causal: bool,
                key_padding_mask: "torch.Tensor | None" = None, device=None) -> torch.Tensor:
    """Bool visibility (B or 1, 1, Lq, Lk), True = visible, of the sliding window with sinks."""
    p = torch.arange(lq, device=device)[:, None] + (lk - lq if causal else 0)
    j = torch.arange(lk, device=device)[None, :]
    if causal:
        visible = ((p - j) <= window) & (j <= p)
        visible |= (j < sinks) & (j <= p)
    else:
        visible = ((p - j).abs() <= window) | (j < sinks)
    visible = visible[None, None]
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.to(device=visible.device, dtype=torch.bool)[:, None, None, :]
    return visible


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int = 0,
                               causal: bool = False, key_padding_mask: "torch.Tensor | None" = None,
                               scale: "float | None" = None) -> torch.Tensor:
    """Dense masked softmax: softmax(q k^T * scale + mask) v, rows with no visible key zero.
    q (B, H, Lq, D), k, v (B, H, Lk, D) (heads already repeated for GQA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    visible = window_mask(q.shape[-2], k.shape[-2], window, sinks, causal, key_padding_mask, q.device)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    seen = visible.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
    return probs @ v


# Triton kernels --------------------------------------------------------------------------------------------

if triton_import_error() is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _visible(rows, cols, PAD, batch, LQ, LK, OFFSET, WINDOW, SINKS, CAUSAL: tl.constexpr,
                 HAS_PAD: tl.constexpr):
        """(BLOCK_M, BLOCK_N) bool visibility of query rows x key columns."""
        p = rows[:, None] + OFFSET
        j = cols[None, :]
        if CAUSAL:
            vis = (j <= p) & ((p - j <= WINDOW) | (j < SINKS))
        else:
            d = p - j
            vis = ((d <= WINDOW) & (d >= -WINDOW)) | (j < SINKS)
        vis = vis & (rows[:, None] < LQ) & (j < LK)
        if HAS_PAD:
            pad = tl.load(PAD + batch * LK + cols, mask=cols < LK, other=1)
            vis = vis & (pad == 0)[None, :]
        return vis

    @triton.jit
    def _key_blocks(start_m, LK, OFFSET, WINDOW, SINKS, CAUSAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """(sink block end, window block start, window block end) for the query block starting at start_m."""
        p_lo = start_m + OFFSET
        p_hi = p_lo + BLOCK_M - 1
        if CAUSAL:
            last = tl.minimum(LK - 1, p_hi)
        else:
            last = tl.minimum(LK - 1, p_hi + WINDOW)
        first = tl.maximum(0, p_lo - WINDOW)
        lo = first // BLOCK_N
        hi = tl.where(last < first, lo, tl.maximum(lo, (last + BLOCK_N) // BLOCK_N))
        sink_hi = tl.minimum((SINKS + BLOCK_N - 1) // BLOCK_N, lo)
        return sink_hi, lo, hi

    @triton.jit
    def _fwd_step(acc, m_i, l_i, q, K, V, PAD, rows, start_n, batch, LQ, LK, D, OFFSET, WINDOW, SINKS, QK_SCALE,
                  CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (cols[:, None] < LK) & (offs_d[None, :] < D)
        k = tl.load(K + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * QK_SCALE
        else:
            s = tl.dot(q, tl.trans(k)) * QK_SCALE
        vis = _visible(rows, cols, PAD, batch, LQ, LK, OFFSET, WINDOW, SINKS, CAUSAL, HAS_PAD)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.where(vis, tl.exp2(s - m_safe[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _window_fwd_kernel(Q, K, V, PAD, OUT, LSE, H, LQ, LK, D, OFFSET, WINDOW, SINKS, QK_SCALE,
                           CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        start_m = tl.program_id(1) * BLOCK_M
        batch = bh // H
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (rows[:, None] < LQ) & (offs_d[None, :] < D)
        q = tl.load(Q + bh * LQ * D + rows[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        k_ptr = K + bh * LK * D
        v_ptr = V + bh * LK * D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sink_hi, lo, hi = _key_blocks(start_m, LK, OFFSET, WINDOW, SINKS, CAUSAL, BLOCK_M, BLOCK_N)
        for nb in range(0, sink_hi):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, PAD, rows, nb * BLOCK_N, batch, LQ, LK, D,
                                      OFFSET, WINDOW, SINKS, QK_SCALE, CAUSAL, HAS_PAD, IEEE, BLOCK_N, BLOCK_D)
        for nb in range(lo, hi):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, PAD, rows, nb * BLOCK_N, batch, LQ, LK, D,
                                      OFFSET, WINDOW, SINKS, QK_SCALE, CAUSAL, HAS_PAD, IEEE, BLOCK_N, BLOCK_D)
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(OUT + bh * LQ * D + rows[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=q_mask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
        tl.store(LSE + bh * LQ + rows, lse, mask=rows < LQ)

    @triton.jit
    def _bwd_probs(q, k, lse, rows, cols, PAD, batch, LQ, LK, OFFSET, WINDOW, SINKS, QK_SCALE,
                   CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr):
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * QK_SCALE
        else:
            s = tl.dot(q, tl.trans(k)) * QK_SCALE
        vis = _visible(rows, cols, PAD, batch, LQ, LK, OFFSET, WINDOW, SINKS, CAUSAL, HAS_PAD)
        return tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)

    @triton.jit
    def _window_bwd_dkdv_kernel(Q, K, V, PAD, DO, LSE, DELTA, DK, DV, H, LQ, LK, D, OFFSET, WINDOW, SINKS,
                                QK_SCALE, SM_SCALE, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                                IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        start_n = tl.program_id(1) * BLOCK_N
        batch = bh // H
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (cols[:, None] < LK) & (offs_d[None, :] < D)
        k = tl.load(K + bh * LK * D + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + bh * LK * D + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        # queries whose window reaches these keys: p in [j - w, j + w] (causal: [j, j + w]); sinks: all
        if CAUSAL:
            p_lo = start_n
        else:
            p_lo = start_n - WINDOW
        p_hi = start_n + BLOCK_N - 1 + WINDOW
        i_lo = tl.maximum(0, p_lo - OFFSET)
        i_hi = tl.minimum(LQ - 1, p_hi - OFFSET)
        lo = i_lo // BLOCK_M
        hi = tl.where(i_hi < i_lo, lo, tl.maximum(lo, (i_hi + BLOCK_M) // BLOCK_M))
        has_sinks = start_n < SINKS  # a key block holding sinks is seen by every query block
        lo = tl.where(has_sinks, 0, lo)
        hi = tl.where(has_sinks, (LQ + BLOCK_M - 1) // BLOCK_M, hi)
        q_ptr = Q + bh * LQ * D
        do_ptr = DO + bh * LQ * D
        for mb in range(lo, hi):
            rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            q_mask = (rows[:, None] < LQ) & (offs_d[None, :] < D)
            q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_ptr + rows[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * LQ + rows, mask=rows < LQ, other=float("inf"))
            delta = tl.load(DELTA + bh * LQ + rows, mask=rows < LQ, other=0.0)
            p = _bwd_probs(q, k, lse, rows, cols, PAD, batch, LQ, LK, OFFSET, WINDOW, SINKS, QK_SCALE,
                           CAUSAL, HAS_PAD, IEEE)
            if IEEE:
                dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.store(DK + bh * LK * D + cols[:, None] * D + offs_d[None, :], (dk * SM_SCALE).to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(DV + bh * LK * D + cols[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _dq_step(dq, q, do, lse, delta, K, V, PAD, rows, start_n, batch, LQ, LK, D, OFFSET, WINDOW, SINKS,
                 QK_SCALE, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (cols[:, None] < LK) & (offs_d[None, :] < D)
        k = tl.load(K + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        p = _bwd_probs(q, k, lse, rows, cols, PAD, batch, LQ, LK, OFFSET, WINDOW, SINKS, QK_SCALE,
                       CAUSAL, HAS_PAD, IEEE)
        if IEEE:
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        return dq

    @triton.jit
    def _window_bwd_dq_kernel(Q, K, V, PAD, DO, LSE, DELTA, DQ, H, LQ, LK, D, OFFSET, WINDOW, SINKS,
                              QK_SCALE, SM_SCALE, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                              IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)
        start_m = tl.program_id(1) * BLOCK_M
        batch = bh // H
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = (rows[:, None] < LQ) & (offs_d[None, :] < D)
        q = tl.load(Q + bh * LQ * D + rows[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + bh * LQ * D + rows[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * LQ + rows, mask=rows < LQ, other=float("inf"))
        delta = tl.load(DELTA + bh * LQ + rows, mask=rows < LQ, other=0.0)
        k_ptr = K + bh * LK * D
        v_ptr = V + bh * LK * D
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        sink_hi, lo, hi = _key_blocks(start_m, LK, OFFSET, WINDOW, SINKS, CAUSAL, BLOCK_M, BLOCK_N)
        for nb in range(0, sink_hi):
            dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, PAD, rows, nb * BLOCK_N, batch, LQ, LK, D, OFFSET,
                          WINDOW, SINKS, QK_SCALE, CAUSAL, HAS_PAD, IEEE, BLOCK_N, BLOCK_D)
        for nb in range(lo, hi):
            dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, PAD, rows, nb * BLOCK_N, batch, LQ, LK, D, OFFSET,
                          WINDOW, SINKS, QK_SCALE, CAUSAL, HAS_PAD, IEEE, BLOCK_N, BLOCK_D)
        tl.store(DQ + bh * LQ * D + rows[:, None] * D + offs_d[None, :], (dq * SM_SCALE).to(DQ.dtype.element_ty),
                 mask=q_mask)


# launchers ----------------------------------------------------------------------------------------------

class _WindowAttention(torch.autograd.Function):
    """Triton forward and backward of sliding-window attention on flat (N, L, D) tensors."""

    @staticmethod
    def forward(ctx, q, k, v, pad, heads, window, sinks, causal, scale, block_m, block_n):
        n, lq, d = q.shape
        lk = k.shape[-2]
        offset = lk - lq if causal else 0
        out = torch.empty_like(q)
        lse = torch.empty(n, lq, device=q.device, dtype=torch.float32)
        grid = (n, triton.cdiv(lq, block_m))
        _window_fwd_kernel[grid](
            q, k, v, out if pad is None else pad, out, lse, heads, lq, lk, d, offset, window, sinks,
            scale * LOG2E, CAUSAL=causal, HAS_PAD=pad is not None, IEEE=q.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_power_of_2(d),
        )
        ctx.save_for_backward(q, k, v, out, lse, pad)
        ctx.cfg = (heads, window, sinks, causal, scale, block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, pad = ctx.saved_tensors
        heads, window, sinks, causal, scale, block_m, block_n = ctx.cfg
        n, lq, d = q.shape
        lk = k.shape[-2]
        offset = lk - lq if causal else 0
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(CAUSAL=causal, HAS_PAD=pad is not None, IEEE=q.dtype == torch.float32,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_power_of_2(d))
        pad_arg = dq if pad is None else pad
        _window_bwd_dkdv_kernel[(n, triton.cdiv(lk, block_n))](
            q, k, v, pad_arg, dout, lse, delta, dk, dv, heads, lq, lk, d, offset, window, sinks,
            scale * LOG2E, scale, **common)
        _window_bwd_dq_kernel[(n, triton.cdiv(lq, block_m))](
            q, k, v, pad_arg, dout, lse, delta, dq, heads, lq, lk, d, offset, window, sinks,
            scale * LOG2E, scale, **common)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int = 0,
                     causal: bool = False, key_padding_mask: "torch.Tensor | None" = None,
                     scale: "float | None" = None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Sliding-window (+ sink) softmax attention by the Triton kernels (see the module docstring).

    q (B, H, Lq, D), k, v (B, H, Lk, D) with the same head count (repeat GQA heads before the call), one
    dtype among float16/bfloat16/float32; key_padding_mask (B, Lk) bool, True = padding."""
    missing = triton_import_error()
    if missing:
        raise RuntimeError(f"cab's Triton kernels cannot run: {missing}")
    for t in (q, k, v):
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"cab's Triton window kernel takes float16, bfloat16 or float32, got {t.dtype}")
    if window < 0 or sinks < 0:
        raise ValueError(f"window and sinks must be >= 0, got {window}, {sinks}")
    batch, heads, lq, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    flat = [x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous() for x in (q, k, v)]
    out = _WindowAttention.apply(*flat, pad, heads, int(window), int(sinks), bool(causal), scale,
                                 next_power_of_2(block_m), next_power_of_2(block_n))
    return out.view(batch, heads, lq, -1)
