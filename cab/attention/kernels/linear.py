"""Linear-attention kernels in Triton, each beside its pure-PyTorch reference.

Causal (Lightning Attention-2 tiling, Qin et al. 2024, Sec. 3): for q, k (N, L, Dk), v (N, L, Dv) and a
per-head decay lambda_h = exp(-s_h) (s_h >= 0; s = 0 is plain causal linear attention),

    num_t = sum_{j <= t} lambda^(t-j) (q_t . k_j) v_j          den_t = sum_{j <= t} lambda^(t-j) (q_t . k_j)

computed block by block along the sequence: inside a block of C rows the C x C decayed score matrix is
explicit ("intra"), the earlier blocks enter through the carried state KV = sum_j lambda^(...) k_j v_j^T
(Dk x Dv, fp32) and z = sum_j lambda^(...) k_j ("inter"); every decay exponent is <= 0, so nothing
overflows. Two schedules: "sequential" (Lightning-2's loop: one program per (batch*head, block of Dv
columns) walks the blocks in order, carrying the state) and "chunked" (default: one program per (head, Dk
block, Dv block) walks the blocks computing only the entering states, which are stored, then every block's
output is computed in parallel — more parallel work at small batch*heads, at the cost of L/C * Dk * Dv
stored state values per head). `den` (the normaliser of feature-map linear attention) is an optional extra
output computed in the same pass.

The backward uses the same kernel three more times, because each gradient is again a (reversed) decayed
causal product: with dO the output gradient and dd the normaliser's,

    dq_t = sum_{j <= t} lambda^(t-j) (dO_t . v_j + dd_t) k_j         (q' = dO, k' = v, v' = k)
    dk_j = sum_{t >= j} lambda^(t-j) (v_j . dO_t + dd_t) q_t         (reversed; q' = v, k' = dO, v' = q)
    dv_j = sum_{t >= j} lambda^(t-j) (k_j . q_t) dO_t                (reversed; q' = k, k' = q, v' = dO)

where the scalar term dd_t enters the scores as an extra rank-one column (`qx_t kx_j`). The decay is a
constant of the attention: no gradient flows to it.

Noncausal: KV = K^T V and z = K^T 1 per head (a reduction kernel over L, one program per (head, Dk block,
Dv block)), then num = Q KV and den = Q z (an apply kernel, one program per (head, L block, Dv block)).
Backward: dKV = Q^T dO and dz = Q^T dd (reduction), dq = dO KV^T + dd z^T, dk = V dKV^T + 1 dz^T,
dv = K dKV (apply).

Kernels take float16, bfloat16 or float32 (accumulation in fp32; float32 dot products in IEEE precision,
half-precision inputs use the tensor cores with fp32 accumulation). Launch them through
`causal_linear_attention` and `noncausal_linear_attention`; they run on CUDA, or on CPU tensors under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from cab.attention.kernels import next_power_of_2, triton_import_error

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# pure-PyTorch references ---------------------------------------------------------------------------------

def decay_weights(length_q: int, length_k: int, log_decay: "torch.Tensor | None", causal: bool,
                  device, dtype) -> torch.Tensor:
    """(H or 1, Lq, Lk) multipliers lambda^(t-j) on j <= t (causal), 1 everywhere (noncausal, no decay)."""
    t = torch.arange(length_q, device=device, dtype=dtype)[:, None]
    j = torch.arange(length_k, device=device, dtype=dtype)[None, :]
    gap = t - j
    if log_decay is None:
        weights = torch.ones(1, length_q, length_k, device=device, dtype=dtype)
    else:
        weights = torch.exp(-log_decay.to(device=device, dtype=dtype)[:, None, None] * gap.clamp_min(0))
    if causal:
        weights = weights * (gap >= 0)
    return weights


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               log_decay: "torch.Tensor | None" = None, causal: bool = True,
                               ) -> "tuple[torch.Tensor, torch.Tensor]":
    """(num, den) from the explicit Lq x Lk weight matrix W = (Q K^T) * decay mask: num = W V, den = W 1.

    q (B, H, Lq, Dk), k (B, H, Lk, Dk), v (B, H, Lk, Dv); log_decay (H,) or None; causal needs Lq == Lk
    (row t sees keys j <= t with weight lambda^(t-j))."""
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError("causal linear attention needs Lq == Lk (align bottom-right before the call)")
    weights = (q @ k.transpose(-1, -2)) * decay_weights(q.shape[-2], k.shape[-2], log_decay, causal,
                                                        q.device, q.dtype)
    return weights @ v, weights.sum(dim=-1)


# Triton kernels --------------------------------------------------------------------------------------------

if triton_import_error() is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _causal_kernel(Q, K, V, QX, KX, LOG_DECAY, OUT, RS, L, H, DK, DV,
                       HAS_DECAY: tl.constexpr, HAS_X: tl.constexpr, HAS_RS: tl.constexpr,
                       REVERSE: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_E: tl.constexpr):
        """OUT[t] = sum_{j <= t} lambda^(t-j) s_tj V[j] (REVERSE: j >= t, lambda^(j-t)), s_tj = Q[t].K[j]
        (+ QX[t] KX[j] when HAS_X); RS[t] = sum_j lambda^|t-j| s_tj when HAS_RS. Program (head, Dv block)."""
        bh = tl.program_id(0)
        eb = tl.program_id(1)
        offs_c = tl.arange(0, BLOCK_C)
        offs_k = tl.arange(0, BLOCK_DK)
        offs_e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
        kmask = offs_k < DK
        emask = offs_e < DV
        q_ptr = Q + bh * L * DK
        k_ptr = K + bh * L * DK
        v_ptr = V + bh * L * DV
        o_ptr = OUT + bh * L * DV
        pos = offs_c.to(tl.float32)
        if HAS_DECAY:
            s = tl.load(LOG_DECAY + bh % H).to(tl.float32)
        else:
            s = 0.0
        if REVERSE:
            visible = offs_c[None, :] >= offs_c[:, None]
            gap = pos[None, :] - pos[:, None]
            row_decay = tl.exp(-s * (BLOCK_C - pos))  # row a to the end of its block
            key_decay = tl.exp(-s * pos)  # key b to the start of its block
        else:
            visible = offs_c[None, :] <= offs_c[:, None]
            gap = pos[:, None] - pos[None, :]
            row_decay = tl.exp(-s * (pos + 1.0))  # row a to the last key of the previous block
            key_decay = tl.exp(-s * (BLOCK_C - 1.0 - pos))  # key b to the last row of its block
        weight = tl.where(visible, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
        block_decay = tl.exp(-s * BLOCK_C)
        state = tl.zeros((BLOCK_DK, BLOCK_E), dtype=tl.float32)
        xstate = tl.zeros((BLOCK_E,), dtype=tl.float32)
        zstate = tl.zeros((BLOCK_DK,), dtype=tl.float32)
        n_blocks = tl.cdiv(L, BLOCK_C)
        for i in range(0, n_blocks):
            if REVERSE:
                c = n_blocks - 1 - i
            else:
                c = i
            rows = c * BLOCK_C + offs_c
            rmask = rows < L
            qk_mask = rmask[:, None] & kmask[None, :]
            v_mask = rmask[:, None] & emask[None, :]
            q = tl.load(q_ptr + rows[:, None] * DK + offs_k[None, :], mask=qk_mask, other=0.0)
            k = tl.load(k_ptr + rows[:, None] * DK + offs_k[None, :], mask=qk_mask, other=0.0)
            v = tl.load(v_ptr + rows[:, None] * DV + offs_e[None, :], mask=v_mask, other=0.0)
            scores = _dot(q, tl.trans(k), IEEE)
            if HAS_X:
                qx = tl.load(QX + bh * L + rows, mask=rmask, other=0.0).to(tl.float32)
                kx = tl.load(KX + bh * L + rows, mask=rmask, other=0.0).to(tl.float32)
                scores += qx[:, None] * kx[None, :]
            p = scores * weight
            qd = q.to(tl.float32) * row_decay[:, None]
            if IEEE:
                out = _dot(p, v.to(tl.float32), True) + _dot(qd, state, True)
            else:
                out = tl.dot(p.to(v.dtype), v) + tl.dot(qd.to(q.dtype), state.to(q.dtype))
            if HAS_X:
                out += (qx * row_decay)[:, None] * xstate[None, :]
            tl.store(o_ptr + rows[:, None] * DV + offs_e[None, :], out.to(OUT.dtype.element_ty), mask=v_mask)
            if HAS_RS:
                rs = tl.sum(p, axis=1) + tl.sum(qd * zstate[None, :], axis=1)
                if eb == 0:
                    tl.store(RS + bh * L + rows, rs, mask=rmask)
            kd = k.to(tl.float32) * key_decay[:, None]
            if IEEE:
                state = state * block_decay + _dot(tl.trans(kd), v.to(tl.float32), True)
            else:
                state = state * block_decay + tl.dot(tl.trans(kd.to(k.dtype)), v)
            if HAS_X:
                xstate = xstate * block_decay + tl.sum((kx * key_decay)[:, None] * v.to(tl.float32), axis=0)
            if HAS_RS:
                zstate = zstate * block_decay + tl.sum(kd, axis=0)

    @triton.jit
    def _reduce_kernel(A, B, W, S, Z, L, M, N, HAS_W: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """S = A^T B (M x N, fp32) and Z = A^T w (w = W, or 1 on every row). Program (head, M block, N block)."""
        bh = tl.program_id(0)
        mb = tl.program_id(1)
        nb = tl.program_id(2)
        offs_l = tl.arange(0, BLOCK_L)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = offs_m < M
        nmask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        z = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for start in range(0, L, BLOCK_L):
            rows = start + offs_l
            rmask = rows < L
            a = tl.load(A + bh * L * M + rows[:, None] * M + offs_m[None, :], mask=rmask[:, None] & mmask[None, :],
                        other=0.0)
            b = tl.load(B + bh * L * N + rows[:, None] * N + offs_n[None, :], mask=rmask[:, None] & nmask[None, :],
                        other=0.0)
            if IEEE:
                acc += _dot(tl.trans(a).to(tl.float32), b.to(tl.float32), True)
            else:
                acc += tl.dot(tl.trans(a), b)
            if HAS_W:
                w = tl.load(W + bh * L + rows, mask=rmask, other=0.0).to(tl.float32)
            else:
                w = rmask.to(tl.float32)
            z += tl.sum(a.to(tl.float32) * w[:, None], axis=0)
        tl.store(S + bh * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mmask[:, None] & nmask[None, :])
        if nb == 0:
            tl.store(Z + bh * M + offs_m, z, mask=mmask)

    @triton.jit
    def _apply_kernel(X, S, XS, SV, Z, OUT, RS, L, M, N,
                      HAS_EXTRA: tl.constexpr, HAS_RS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """OUT = X S (+ XS SV^T when HAS_EXTRA; XS a per-row scalar or 1 when XS is None-like), RS = X Z
        when HAS_RS. S (M x N) and SV (N), Z (M) are fp32. Program (head, L block, N block)."""
        bh = tl.program_id(0)
        lb = tl.program_id(1)
        nb = tl.program_id(2)
        rows = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < L
        mmask = offs_m < M
        nmask = offs_n < N
        x = tl.load(X + bh * L * M + rows[:, None] * M + offs_m[None, :], mask=rmask[:, None] & mmask[None, :],
                    other=0.0)
        s = tl.load(S + bh * M * N + offs_m[:, None] * N + offs_n[None, :], mask=mmask[:, None] & nmask[None, :],
                    other=0.0)
        if IEEE:
            out = _dot(x.to(tl.float32), s, True)
        else:
            out = tl.dot(x, s.to(x.dtype))
        if HAS_EXTRA:
            xs = tl.load(XS + bh * L + rows, mask=rmask, other=0.0).to(tl.float32)
            sv = tl.load(SV + bh * N + offs_n, mask=nmask, other=0.0)
            out += xs[:, None] * sv[None, :]
        tl.store(OUT + bh * L * N + rows[:, None] * N + offs_n[None, :], out.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])
        if HAS_RS:
            z = tl.load(Z + bh * M + offs_m, mask=mmask, other=0.0)
            rs = tl.sum(x.to(tl.float32) * z[None, :], axis=1)
            if nb == 0:
                tl.store(RS + bh * L + rows, rs, mask=rmask)


    @triton.jit
    def _decay_factors(s, BLOCK_C: tl.constexpr, REVERSE: tl.constexpr):
        """(intra-block weights, row factors, key factors, block factor) of decay exp(-s), as in _causal_kernel."""
        offs_c = tl.arange(0, BLOCK_C)
        pos = offs_c.to(tl.float32)
        if REVERSE:
            visible = offs_c[None, :] >= offs_c[:, None]
            gap = pos[None, :] - pos[:, None]
            row_decay = tl.exp(-s * (BLOCK_C - pos))
            key_decay = tl.exp(-s * pos)
        else:
            visible = offs_c[None, :] <= offs_c[:, None]
            gap = pos[:, None] - pos[None, :]
            row_decay = tl.exp(-s * (pos + 1.0))
            key_decay = tl.exp(-s * (BLOCK_C - 1.0 - pos))
        weight = tl.where(visible, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
        return weight, row_decay, key_decay, tl.exp(-s * BLOCK_C)

    @triton.jit
    def _chunk_state_kernel(K, V, KX, LOG_DECAY, HS, XS, ZS, L, H, DK, DV, NC,
                            HAS_DECAY: tl.constexpr, HAS_X: tl.constexpr, HAS_RS: tl.constexpr,
                            REVERSE: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
        """Chunked schedule, pass 1: the state entering every block (in processing order), HS[bh, c] =
        (Dk block x Dv block) of sum lambda^(...) K^T V, XS[bh, c] its KX column (HAS_X), ZS[bh, c] the key
        sum (HAS_RS). Program (head, Dk block, Dv block); only this K^T V product is sequential."""
        bh = tl.program_id(0)
        kb = tl.program_id(1)
        eb = tl.program_id(2)
        offs_c = tl.arange(0, BLOCK_C)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
        kmask = offs_k < DK
        emask = offs_e < DV
        if HAS_DECAY:
            s = tl.load(LOG_DECAY + bh % H).to(tl.float32)
        else:
            s = 0.0
        weight, row_decay, key_decay, block_decay = _decay_factors(s, BLOCK_C, REVERSE)
        state = tl.zeros((BLOCK_K, BLOCK_E), dtype=tl.float32)
        xstate = tl.zeros((BLOCK_E,), dtype=tl.float32)
        zstate = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for i in range(0, NC):
            if REVERSE:
                c = NC - 1 - i
            else:
                c = i
            base = (bh * NC + c).to(tl.int64)
            tl.store(HS + base * DK * DV + offs_k[:, None] * DV + offs_e[None, :], state.to(HS.dtype.element_ty),
                     mask=kmask[:, None] & emask[None, :])
            rows = c * BLOCK_C + offs_c
            rmask = rows < L
            k = tl.load(K + bh * L * DK + rows[:, None] * DK + offs_k[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0)
            v = tl.load(V + bh * L * DV + rows[:, None] * DV + offs_e[None, :], mask=rmask[:, None] & emask[None, :],
                        other=0.0)
            kd = k.to(tl.float32) * key_decay[:, None]
            if IEEE:
                state = state * block_decay + _dot(tl.trans(kd), v.to(tl.float32), True)
            else:
                state = state * block_decay + tl.dot(tl.trans(kd.to(k.dtype)), v)
            if HAS_X:
                if kb == 0:
                    tl.store(XS + base * DV + offs_e, xstate, mask=emask)
                kx = tl.load(KX + bh * L + rows, mask=rmask, other=0.0).to(tl.float32)
                xstate = xstate * block_decay + tl.sum((kx * key_decay)[:, None] * v.to(tl.float32), axis=0)
            if HAS_RS:
                if eb == 0:
                    tl.store(ZS + base * DK + offs_k, zstate, mask=kmask)
                zstate = zstate * block_decay + tl.sum(kd, axis=0)

    @triton.jit
    def _chunk_out_kernel(Q, K, V, QX, KX, LOG_DECAY, HS, XS, ZS, OUT, RS, L, H, DK, DV, NC,
                          HAS_DECAY: tl.constexpr, HAS_X: tl.constexpr, HAS_RS: tl.constexpr,
                          REVERSE: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_E: tl.constexpr):
        """Chunked schedule, pass 2: every block independently — the intra-block decayed product plus the
        entering state from pass 1. Program (head, block, Dv block)."""
        bh = tl.program_id(0)
        c = tl.program_id(1)
        eb = tl.program_id(2)
        offs_c = tl.arange(0, BLOCK_C)
        offs_k = tl.arange(0, BLOCK_DK)
        offs_e = eb * BLOCK_E + tl.arange(0, BLOCK_E)
        kmask = offs_k < DK
        emask = offs_e < DV
        if HAS_DECAY:
            s = tl.load(LOG_DECAY + bh % H).to(tl.float32)
        else:
            s = 0.0
        weight, row_decay, key_decay, block_decay = _decay_factors(s, BLOCK_C, REVERSE)
        rows = c * BLOCK_C + offs_c
        rmask = rows < L
        qk_mask = rmask[:, None] & kmask[None, :]
        v_mask = rmask[:, None] & emask[None, :]
        q = tl.load(Q + bh * L * DK + rows[:, None] * DK + offs_k[None, :], mask=qk_mask, other=0.0)
        k = tl.load(K + bh * L * DK + rows[:, None] * DK + offs_k[None, :], mask=qk_mask, other=0.0)
        v = tl.load(V + bh * L * DV + rows[:, None] * DV + offs_e[None, :], mask=v_mask, other=0.0)
        base = (bh * NC + c).to(tl.int64)
        state = tl.load(HS + base * DK * DV + offs_k[:, None] * DV + offs_e[None, :],
                        mask=kmask[:, None] & emask[None, :], other=0.0)
        scores = _dot(q, tl.trans(k), IEEE)
        if HAS_X:
            qx = tl.load(QX + bh * L + rows, mask=rmask, other=0.0).to(tl.float32)
            kx = tl.load(KX + bh * L + rows, mask=rmask, other=0.0).to(tl.float32)
            scores += qx[:, None] * kx[None, :]
        p = scores * weight
        qd = q.to(tl.float32) * row_decay[:, None]
        if IEEE:
            out = _dot(p, v.to(tl.float32), True) + _dot(qd, state.to(tl.float32), True)
        else:
            out = tl.dot(p.to(v.dtype), v) + tl.dot(qd.to(q.dtype), state.to(q.dtype))
        if HAS_X:
            xstate = tl.load(XS + base * DV + offs_e, mask=emask, other=0.0)
            out += (qx * row_decay)[:, None] * xstate[None, :]
        tl.store(OUT + bh * L * DV + rows[:, None] * DV + offs_e[None, :], out.to(OUT.dtype.element_ty), mask=v_mask)
        if HAS_RS:
            if eb == 0:
                zstate = tl.load(ZS + base * DK + offs_k, mask=kmask, other=0.0)
                rs = tl.sum(p, axis=1) + tl.sum(qd * zstate[None, :], axis=1)
                tl.store(RS + bh * L + rows, rs, mask=rmask)


# launchers ----------------------------------------------------------------------------------------------

def _check_inputs(*tensors: torch.Tensor) -> None:
    missing = triton_import_error()
    if missing:
        raise RuntimeError(f"cab's Triton kernels cannot run: {missing}")
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"cab's Triton linear-attention kernels take float16, bfloat16 or float32, got {t.dtype}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(..., L, D) as a contiguous (N, L, D)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


SCHEDULES = ("chunked", "sequential")


def _causal_launch(q, k, v, log_decay, heads, qx=None, kx=None, with_rowsum=False, reverse=False,
                   block_c=64, block_e=64, schedule="chunked"):
    """One decayed causal product on flat (N, L, D) tensors; returns (out (N, L, Dv), rowsum (N, L) or None).

    schedule "sequential": `_causal_kernel`, one program per (head, Dv block) walking every block (Lightning
    Attention-2's loop: the whole product is sequential along L). "chunked": `_chunk_state_kernel` walks the
    blocks computing only the entering states (stored: N * L/C * Dk * Dv values, in the input dtype for
    half precision, fp32 otherwise), then `_chunk_out_kernel` computes every block in parallel."""
    n, length, dk = q.shape
    dv = v.shape[-1]
    out = torch.empty(n, length, dv, device=q.device, dtype=q.dtype)
    rowsum = torch.empty(n, length, device=q.device, dtype=torch.float32) if with_rowsum else out
    block_dk = next_power_of_2(dk)
    block_e = min(next_power_of_2(block_e), next_power_of_2(dv))
    block_c = next_power_of_2(block_c)
    dummy = out
    flags = dict(HAS_DECAY=log_decay is not None, HAS_X=qx is not None, HAS_RS=with_rowsum, REVERSE=reverse,
                 IEEE=_ieee(q.dtype))
    decay_arg = dummy if log_decay is None else log_decay
    qx_arg, kx_arg = (dummy if qx is None else qx), (dummy if kx is None else kx)
    if schedule == "sequential":
        _causal_kernel[(n, triton.cdiv(dv, block_e))](
            q, k, v, qx_arg, kx_arg, decay_arg, out, rowsum, length, heads, dk, dv,
            BLOCK_C=block_c, BLOCK_DK=block_dk, BLOCK_E=block_e, **flags)
        return out, (rowsum if with_rowsum else None)
    if schedule != "chunked":
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    blocks = triton.cdiv(length, block_c)
    state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    states = torch.empty(n, blocks, dk, dv, device=q.device, dtype=state_dtype)
    xstates = torch.empty(n, blocks, dv, device=q.device, dtype=torch.float32) if qx is not None else dummy
    zstates = torch.empty(n, blocks, dk, device=q.device, dtype=torch.float32) if with_rowsum else dummy
    block_k = min(64, block_dk)
    _chunk_state_kernel[(n, triton.cdiv(dk, block_k), triton.cdiv(dv, block_e))](
        k, v, kx_arg, decay_arg, states, xstates, zstates, length, heads, dk, dv, blocks,
        BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_E=block_e, **flags)
    _chunk_out_kernel[(n, blocks, triton.cdiv(dv, block_e))](
        q, k, v, qx_arg, kx_arg, decay_arg, states, xstates, zstates, out, rowsum, length, heads, dk, dv, blocks,
        BLOCK_C=block_c, BLOCK_DK=block_dk, BLOCK_E=block_e, **flags)
    return out, (rowsum if with_rowsum else None)


class _CausalLinear(torch.autograd.Function):
    """Triton forward and backward of decayed causal linear attention on flat (N, L, D) tensors."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, heads, with_den, block_c, block_e, schedule):
        num, den = _causal_launch(q, k, v, log_decay, heads, with_rowsum=with_den, block_c=block_c,
                                  block_e=block_e, schedule=schedule)
        ctx.save_for_backward(q, k, v, log_decay)
        ctx.heads, ctx.with_den, ctx.block_c, ctx.block_e = heads, with_den, block_c, block_e
        ctx.schedule = schedule
        if with_den:
            return num, den
        return num

    @staticmethod
    def backward(ctx, dnum, dden=None):
        q, k, v, log_decay = ctx.saved_tensors
        dnum = dnum.contiguous()
        opts = dict(block_c=ctx.block_c, block_e=ctx.block_e, schedule=ctx.schedule)
        ones = dd = None
        if ctx.with_den and dden is not None:
            dd = dden.to(torch.float32).contiguous()
            ones = torch.ones_like(dd)
        dq, _ = _causal_launch(dnum, v, k, log_decay, ctx.heads, qx=dd, kx=ones, **opts)
        dk, _ = _causal_launch(v, dnum, q, log_decay, ctx.heads, qx=ones, kx=dd, reverse=True, **opts)
        dv, _ = _causal_launch(k, q, dnum, log_decay, ctx.heads, reverse=True, **opts)
        return dq, dk, dv, None, None, None, None, None, None


def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            log_decay: "torch.Tensor | None" = None, with_normaliser: bool = False,
                            block_c: int = 64, block_e: int = 64, schedule: str = "chunked"):
    """Decayed causal linear attention by the Triton kernels: num (B, H, L, Dv), and with_normaliser also
    den (B, H, L) in float32 (divide num by it for feature-map attention).

    q, k (B, H, L, Dk), v (B, H, L, Dv), same dtype (float16/bfloat16/float32); log_decay (H,) holds
    s_h >= 0 with lambda_h = exp(-s_h), or None for no decay (not differentiated). block_c is the tile
    length (Lightning's block), block_e the Dv columns per program; schedule "chunked" (states first, then
    every block in parallel) or "sequential" (one loop over the blocks per program), forward and backward."""
    _check_inputs(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError("causal linear attention needs Lq == Lk (align bottom-right before the call)")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    batch, heads, length, _ = q.shape
    if log_decay is not None:
        log_decay = log_decay.detach().to(device=q.device, dtype=torch.float32).contiguous()
        if log_decay.shape != (heads,):
            raise ValueError(f"log_decay must have shape ({heads},), got {tuple(log_decay.shape)}")
    result = _CausalLinear.apply(_flat(q), _flat(k), _flat(v), log_decay, heads, with_normaliser, block_c, block_e,
                                 schedule)
    if with_normaliser:
        num, den = result
        return num.view(batch, heads, length, -1), den.view(batch, heads, length)
    return result.view(batch, heads, length, -1)


def _reduce_launch(a, b, w=None, block_l=64, block_n=64, block_m=64):
    n, length, m = a.shape
    nn = b.shape[-1]
    state = torch.empty(n, m, nn, device=a.device, dtype=torch.float32)
    z = torch.empty(n, m, device=a.device, dtype=torch.float32)
    block_m = min(next_power_of_2(block_m), next_power_of_2(m))
    block_n = min(next_power_of_2(block_n), next_power_of_2(nn))
    grid = (n, triton.cdiv(m, block_m), triton.cdiv(nn, block_n))
    _reduce_kernel[grid](a, b, z if w is None else w, state, z, length, m, nn, HAS_W=w is not None,
                         IEEE=_ieee(a.dtype), BLOCK_L=next_power_of_2(block_l), BLOCK_M=block_m, BLOCK_N=block_n)
    return state, z


def _apply_launch(x, state, xs=None, sv=None, z=None, out_dtype=None, block_l=64, block_n=64):
    n, length, m = x.shape
    nn = state.shape[-1]
    out = torch.empty(n, length, nn, device=x.device, dtype=out_dtype or x.dtype)
    rowsum = torch.empty(n, length, device=x.device, dtype=torch.float32) if z is not None else out
    block_n = min(next_power_of_2(block_n), next_power_of_2(nn))
    block_l = next_power_of_2(block_l)
    grid = (n, triton.cdiv(length, block_l), triton.cdiv(nn, block_n))
    _apply_kernel[grid](x, state, out if xs is None else xs, out if sv is None else sv, out if z is None else z,
                        out, rowsum, length, m, nn, HAS_EXTRA=sv is not None, HAS_RS=z is not None,
                        IEEE=_ieee(x.dtype), BLOCK_L=block_l, BLOCK_M=next_power_of_2(m), BLOCK_N=block_n)
    return out, (rowsum if z is not None else None)


class _NoncausalLinear(torch.autograd.Function):
    """Triton forward and backward of noncausal linear attention on flat (N, L, D) tensors."""

    @staticmethod
    def forward(ctx, q, k, v, with_den, block_l):
        kv, z = _reduce_launch(k, v, block_l=block_l)
        num, den = _apply_launch(q, kv, z=z if with_den else None, block_l=block_l)
        ctx.save_for_backward(q, k, v, kv, z)
        ctx.with_den, ctx.block_l = with_den, block_l
        return (num, den) if with_den else num

    @staticmethod
    def backward(ctx, dnum, dden=None):
        q, k, v, kv, z = ctx.saved_tensors
        dnum = dnum.contiguous()
        dd = None
        if ctx.with_den and dden is not None:
            dd = dden.to(torch.float32).contiguous()
        dkv, dz = _reduce_launch(q, dnum, w=dd, block_l=ctx.block_l)  # Q^T dO, Q^T dd
        ones = torch.ones(k.shape[0], k.shape[1], device=k.device, dtype=torch.float32) if dd is not None else None
        dq, _ = _apply_launch(dnum, kv.transpose(-1, -2).contiguous(), xs=dd, sv=None if dd is None else z,
                              out_dtype=q.dtype, block_l=ctx.block_l)
        dk, _ = _apply_launch(v, dkv.transpose(-1, -2).contiguous(), xs=ones, sv=None if dd is None else dz,
                              out_dtype=k.dtype, block_l=ctx.block_l)
        dv, _ = _apply_launch(k, dkv, out_dtype=v.dtype, block_l=ctx.block_l)
        return dq, dk, dv, None, None


def noncausal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, with_normaliser: bool = False,
                               block_l: int = 64):
    """Noncausal linear attention by the Triton kernels: num = Q (K^T V) (B, H, Lq, Dv), and with_normaliser
    also den = Q (K^T 1) (B, H, Lq) in float32. q (B, H, Lq, Dk), k (B, H, Lk, Dk), v (B, H, Lk, Dv)."""
    _check_inputs(q, k, v)
    batch, heads, lq, _ = q.shape
    result = _NoncausalLinear.apply(_flat(q), _flat(k), _flat(v), with_normaliser, block_l)
    if with_normaliser:
        num, den = result
        return num.view(batch, heads, lq, -1), den.view(batch, heads, lq)
    return result.view(batch, heads, lq, -1)
