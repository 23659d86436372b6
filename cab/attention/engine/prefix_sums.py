"""Prefix sums of feature-map products, the core of linear attention: the noncausal key summary and the
causal prefix products, chunked (a C x C block within a chunk, a running state across chunks) so that no
L x L tensor and no whole-sequence temporary is formed; the decayed variant with Lightning Attention-2's
tiled hand-written backward; and the sequence chunking every linear attention loops over."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from cab.attention.engine.prepare import nonzero

DEFAULT_BLOCK = 64


# --- the tiled decayed causal product ---------------------------------------------------------------------

def _block_decays(decay: torch.Tensor, block: int, dtype: torch.dtype):
    """Per-head decay factors of one block of size C (decay (H,) in (0, 1]):
    M (H, C, C) = lambda^(i-j) on and below the diagonal, else 0; q_decay (H, C, 1) = lambda^(i+1);
    k_decay (H, C, 1) = lambda^(C-1-j); block_decay (H, 1, 1) = lambda^C."""
    log = torch.log(decay.to(dtype)).reshape(-1, 1, 1)
    pos = torch.arange(block, dtype=dtype, device=decay.device)
    diff = pos[:, None] - pos[None, :]
    tril = diff >= 0
    mask = torch.where(tril, torch.exp(log * diff.clamp(min=0)), torch.zeros((), dtype=dtype, device=decay.device))
    q_decay = torch.exp(log[:, 0] * (pos + 1)).unsqueeze(-1)
    k_decay = torch.exp(log[:, 0] * (block - 1 - pos)).unsqueeze(-1)
    block_decay = torch.exp(log * block)
    return mask, q_decay, k_decay, block_decay


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-x.shape[-2]) % block
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _tiled_forward(q, k, v, decay, block, kv=None):
    """The block loop of the forward (Lightning Attention Alg. 1 / Lightning-2 Alg. 1): per block t,
    O_t = [(Q_t K_t^T) * M] V_t + Lambda Q_t KV, then KV <- lambda^C KV + (lambda^(C-1-j) K_t)^T V_t.
    Starts from the state `kv` (zeros when None); returns (output, state after the last block)."""
    length = q.shape[-2]
    q, k, v = (_pad_to_blocks(t, block) for t in (q, k, v))
    mask, q_decay, k_decay, block_decay = _block_decays(decay, block, q.dtype)
    b, h, padded, dk = q.shape
    if kv is None:
        kv = q.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for start in range(0, padded, block):
        qt, kt, vt = (t[:, :, start:start + block] for t in (q, k, v))
        outs.append(((qt @ kt.transpose(-1, -2)) * mask) @ vt + (qt * q_decay) @ kv)
        kv = block_decay * kv + (kt * k_decay).transpose(-1, -2) @ vt
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out[:, :, :length], kv


class _TiledDecayedCausal(torch.autograd.Function):
    """Lightning Attention-2: tiled forward and hand-written tiled backward of the decayed causal product.
    Saves only q, k, v, the decay and the initial state; the backward recomputes the running state block by
    block (a forward sweep for dQ with KV, a reverse sweep for dK and dV with dKV), so no per-block
    intermediate is stored. Takes an initial state and returns the final one too, so a long sequence can be
    processed in chunks (each a multiple of the block size but the last) with the state carried across."""

    @staticmethod
    def forward(ctx, q, k, v, decay, block, kv0):
        ctx.save_for_backward(q, k, v, decay, kv0)
        ctx.block = block
        return _tiled_forward(q, k, v, decay, block, kv0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_state):
        q, k, v, decay, kv0 = ctx.saved_tensors
        block = ctx.block
        length = q.shape[-2]
        q, k, v, do = (_pad_to_blocks(t, block) for t in (q, k, v, grad_out))
        mask, q_decay, k_decay, block_decay = _block_decays(decay, block, q.dtype)
        b, h, padded, dk = q.shape
        dv_dim = v.shape[-1]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        need_state = ctx.needs_input_grad[5]
        dq = torch.zeros_like(q) if need_q else None
        dk_ = torch.zeros_like(k) if need_k else None
        dv = torch.zeros_like(v) if need_v else None
        if need_q:  # forward sweep: dQ_t = [(dO_t V_t^T) * M] K_t + Lambda dO_t KV^T
            kv = kv0
            for start in range(0, padded, block):
                sl = slice(start, start + block)
                kt, vt, dot = k[:, :, sl], v[:, :, sl], do[:, :, sl]
                dq[:, :, sl] = ((dot @ vt.transpose(-1, -2)) * mask) @ kt + (dot @ kv.transpose(-1, -2)) * q_decay
                kv = block_decay * kv + (kt * k_decay).transpose(-1, -2) @ vt
        dkv = None
        if need_k or need_v or need_state:
            # reverse sweep with dKV = sum over later queries lambda^(p_s - end_t) q_s dO_s^T, plus the
            # gradient of the final state (a "query" at the end of the last block)
            dkv = q.new_zeros(b, h, dk, dv_dim) if grad_state is None else grad_state.clone()
            for start in range(padded - block, -1, -block):
                sl = slice(start, start + block)
                qt, kt, vt, dot = q[:, :, sl], k[:, :, sl], v[:, :, sl], do[:, :, sl]
                if need_k:
                    dk_[:, :, sl] = (((dot @ vt.transpose(-1, -2)) * mask).transpose(-1, -2) @ qt
                                     + (vt @ dkv.transpose(-1, -2)) * k_decay)
                if need_v:
                    dv[:, :, sl] = (((qt @ kt.transpose(-1, -2)) * mask).transpose(-1, -2) @ dot
                                    + (kt * k_decay) @ dkv)
                dkv = block_decay * dkv + (qt * q_decay).transpose(-1, -2) @ dot

        def trim(t):
            return None if t is None else t[:, :, :length]

        return trim(dq), trim(dk_), trim(dv), None, None, (dkv if need_state else None)


def decayed_causal_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: "torch.Tensor | None" = None,
                           block_size: int = DEFAULT_BLOCK, tiled_backward: bool = True,
                           state: "torch.Tensor | None" = None, return_state: bool = False):
    """out_i = sum_{j <= i} lambda_h^(i-j) (q_i . k_j) v_j, causal with Lq == Lk, no normaliser, no L x L tensor.

    q, k (B, H, L, Dk) already feature-mapped (padded keys zeroed), v (B, H, L, Dv), decay (H,) per-head
    lambda in (0, 1] (None: 1, plain causal linear attention). Blocks of `block_size`: the intra-block part
    is the masked, decayed quadratic form, the inter-block part a recurrent (Dk x Dv) state — a loop over
    blocks, no cumulative sum. tiled_backward=True uses Lightning Attention-2's hand-written backward
    (stores only the inputs); False lets autograd record the block loop (Lightning Attention-1, which keeps
    every block's state for the backward).

    `state` (B, H, Dk, Dv) is the recurrent state entering the first block (the decayed sum over earlier
    keys); with return_state the result is (out, state after the last block), exact when L is a multiple
    of block_size (a padded last block would decay the state further).
    """
    if decay is None:
        decay = torch.ones(q.shape[1], dtype=q.dtype, device=q.device)
    decay = decay.to(device=q.device, dtype=q.dtype)
    if state is None:
        state = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    if tiled_backward:
        out, final = _TiledDecayedCausal.apply(q, k, v, decay, block_size, state)
    else:
        out, final = _tiled_forward(q, k, v, decay, block_size, state)
    return (out, final) if return_state else out


def tiled_product_flops(batch: int, heads: int, length: int, dk: int, dv: int, block: int) -> int:
    """Matmul FLOPs of one `decayed_causal_product` forward (per block: QK^T, (.)V, QKV, K^T V)."""
    blocks = -(-length // block)
    return 2 * batch * heads * blocks * (block * block * dk + block * block * dv + 2 * block * dk * dv)


SEQ_CHUNK = 4096  # tokens per chunk of the sequence-level loops (a multiple of every block size used here)


def chunks(length: int, size: int = SEQ_CHUNK):
    """(start, stop) ranges covering 0..length in pieces of `size`. Working per chunk keeps every temporary
    below glibc's mmap threshold (32 MiB): one (1, 4, 32768, 64) float32 tensor is exactly that, and each
    such allocation is a fresh mmap whose page faults made whole-sequence elementwise work superlinear."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Noncausal feature-map attention phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1), in O(L m d).

    phi_q (B, H, Lq, m), phi_k (B, H, Lk, m) non-negative (padded keys already zero), v (B, H, Lk, Dv).
    The normaliser divides whichever is narrower, the features or the output.
    """
    kv = phi_k.transpose(-1, -2) @ v
    inverse = 1.0 / nonzero(phi_q @ phi_k.sum(dim=-2).unsqueeze(-1))
    if phi_q.shape[-1] <= v.shape[-1]:
        return (phi_q * inverse) @ kv
    return (phi_q @ kv) * inverse


def _row_chunks(chunk: int, *xs: torch.Tensor) -> "list[torch.Tensor]":
    """Each (B, H, L, d) tensor's rows zero-padded to a multiple of `chunk` and split, (B, H, N, chunk, d)."""
    pad = (-xs[0].shape[-2]) % chunk
    if pad:
        xs = tuple(F.pad(x, (0, 0, 0, pad)) for x in xs)
    return [x.reshape(*x.shape[:2], x.shape[2] // chunk, chunk, x.shape[-1]) for x in xs]


def _exclusive_prefix(states: torch.Tensor) -> torch.Tensor:
    """The exclusive cumulative sum over the chunk axis (dim 2) of per-chunk states: the state entering each chunk."""
    return F.pad(states.cumsum(dim=2)[:, :, :-1], (0, 0) * (states.dim() - 3) + (1, 0))


def _chunk_tril(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The lower-triangular (C x C) blocks of a b^T within each chunk, (B, H, N, C, C), zero above the diagonal."""
    chunk = a.shape[-2]
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=a.device).tril()
    return (a @ b.transpose(-1, -2)).masked_fill(~tril, 0.0)


def causal_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """Causal feature-map attention: row t uses keys 0..t (Lq == Lk), computed in chunks.

    Within a chunk the (C x C) lower-triangular weight block is explicit; across chunks the prefix sums
    of phi(k) v^T and phi(k) come from an exclusive cumulative sum over per-chunk states, so time is
    O(L (C + m) d) and memory O(L m d / C), with no L x L tensor.
    """
    length = phi_q.shape[-2]
    qc, kc, vc = _row_chunks(chunk_size, phi_q, phi_k, v)
    # per-chunk states and their exclusive prefix sums (the state entering each chunk)
    kv_prev = _exclusive_prefix(kc.transpose(-1, -2) @ vc)  # (B, H, N, m, Dv)
    k_prev = _exclusive_prefix(kc.sum(dim=-2))  # (B, H, N, m)
    weights = _chunk_tril(qc, kc)  # (B, H, N, C, C)
    num = qc @ kv_prev + weights @ vc
    den = (qc @ k_prev.unsqueeze(-1)) + weights.sum(dim=-1, keepdim=True)
    out = (num / nonzero(den)).flatten(2, 3)
    return out[:, :, :length]


def pattern_linear_attention(causal: bool, phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                             chunk_size: int = 64) -> torch.Tensor:
    """Normalised feature-map attention of a pattern: `causal_linear_attention` for causal self (inputs
    aligned bottom-right, Lq == Lk), else `linear_attention` over every key."""
    return causal_linear_attention(phi_q, phi_k, v, chunk_size) if causal else linear_attention(phi_q, phi_k, v)


CHUNK = 64  # rows per chunk of the causal prefix products


def full_products(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_j (a_i . b_j) v_j for every row i, as a (b^T v): a (B, H, Lq, m), b (B, H, Lk, m), v (B, H, Lk, n)."""
    return a @ (b.transpose(-1, -2) @ v)


def causal_products(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """sum_{j <= t} (a_t . b_j) v_j for every row t (Lq == Lk), unnormalised, computed in chunks: the C x C
    lower-triangular block of a b^T within a chunk is explicit, the earlier chunks enter through an
    exclusive cumulative sum of the per-chunk states b^T v. Time O(L (C + m) n), memory O(L m n / C).
    Appending a column of ones to v gives the normaliser sum_{j <= t} a_t . b_j in the last column."""
    length = a.shape[-2]
    ac, bc, vc = _row_chunks(chunk, a, b, v)
    prev = _exclusive_prefix(bc.transpose(-1, -2) @ vc)  # (B, H, N, m, n)
    out = ac @ prev + _chunk_tril(ac, bc) @ vc
    return out.flatten(2, 3)[:, :, :length]


def causal_products_flops(batch: int, heads: int, length: int, m: int, n: int, chunk: int = CHUNK) -> int:
    """Matmul FLOPs of causal_products (as FlopCounterMode counts them)."""
    padded = -(-length // chunk) * chunk
    return 2 * batch * heads * padded * (m * n + chunk * m + m * n + chunk * n)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """v with a trailing column of ones (its products give the normaliser)."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
