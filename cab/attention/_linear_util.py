"""Private helpers of the issue-8 part-1 linear attentions (lightning, flowformer, hedgehog, mala, nalaformer,
lln): the tiled decayed causal linear-attention product (Lightning Attention-2's forward and hand-written
backward), input preparation, and a base class for normalised feature-map attentions with their dense
reference and recurrent decoding. Not a mechanism module (the loader skips names starting with "_")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from cab.attention.base import Attention, repeat_kv
from cab.attention.functional import align_bottom_right, compute_dtype
from cab.patterns import Pattern, attention_mask

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
        trim = (lambda t: None if t is None else t[:, :, :length])
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


# --- preparation and helpers --------------------------------------------------------------------------------

def prepare(attn: Attention, q, k, v, key_padding_mask):
    """Upcast, expand grouped keys/values to the query heads and, under CS, align bottom-right.
    Returns (q, k, v, key_padding_mask, drop, out_dtype): drop the first `drop` output rows afterwards."""
    out_dtype = q.dtype
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype)
    drop = 0
    if attn.pattern is Pattern.CS:
        q, k, v, key_padding_mask, drop = align_bottom_right(q, k, v, key_padding_mask)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
    return q, k, v, key_padding_mask, drop, out_dtype


def real_keys(key_padding_mask: "torch.Tensor | None", like: torch.Tensor) -> "torch.Tensor | None":
    """(B, 1, L, 1) 1.0 for real keys, 0.0 for padded ones (None when nothing is padded)."""
    if key_padding_mask is None:
        return None
    return (~key_padding_mask).to(like.dtype)[:, None, :, None]


def zero_padded(x: torch.Tensor, key_padding_mask: "torch.Tensor | None") -> torch.Tensor:
    if key_padding_mask is None:
        return x
    return x.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def nonzero(den: torch.Tensor) -> torch.Tensor:
    """Zeros replaced by 1 (a row with no weight has a zero numerator too and outputs 0)."""
    return torch.where(den > 0, den, torch.ones_like(den))


def dense_visible(attn: Attention, lq: int, lk: int, key_padding_mask, device, dtype) -> torch.Tensor:
    """(B or 1, 1, Lq, Lk) float visibility of the pattern and padding (CS bottom-right aligned)."""
    return attention_mask(attn.pattern, lq, lk, key_padding_mask, device=device).to(dtype)


SEQ_CHUNK = 4096  # tokens per chunk of the sequence-level loops (a multiple of every block size used here)


def chunks(length: int, size: int = SEQ_CHUNK):
    """(start, stop) ranges covering 0..length in pieces of `size`. Working per chunk keeps every temporary
    below glibc's mmap threshold (32 MiB): one (1, 4, 32768, 64) float32 tensor is exactly that, and each
    such allocation is a fresh mmap whose page faults made whole-sequence elementwise work superlinear."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


# --- normalised feature-map attention base ----------------------------------------------------------------

class FeatureMapAttention(Attention):
    """Normalised feature-map attention out_i = sum_j phi_q(q_i).phi_k(k_j) v_j / sum_j phi_q(q_i).phi_k(k_j)
    over the visible keys, for every pattern: noncausal and causal cross use the whole key summary
    (phi_k^T V, phi_k^T 1) — a row depends on no other query, so CC holds —, CS the tiled causal product
    (bottom-right aligned when Lq != Lk). Subclasses define `features(q, k)`; both maps must be per token
    (no statistics across positions) with non-negative values. Padded keys get zero features. Decoding
    keeps the state (phi_k^T V, phi_k^T 1), O(m Dv) per head whatever the length."""

    block_size: int = DEFAULT_BLOCK
    seq_chunk: int = SEQ_CHUNK
    complexity = {"time": 1, "memory": 1}

    def features(self, q: torch.Tensor, k: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """(phi_q(q), phi_k(k)) of shape (B, H, L, m), both non-negative; per token."""
        raise NotImplementedError

    def _key_features(self, k, key_padding_mask):
        """phi_k with padded keys zeroed — their inputs too, so no garbage reaches exp or pow (an inf
        feature times a zero mask would be NaN in the backward)."""
        phi_k = self.features(None, zero_padded(k, key_padding_mask))[1]
        return zero_padded(phi_k, key_padding_mask)

    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        pad = (lambda a, b: None if key_padding_mask is None else key_padding_mask[:, a:b])  # noqa: E731
        outs = []
        if self.pattern is Pattern.CS:  # chunks of the sequence, the recurrent state carried across
            state = None
            for a, b in chunks(q.shape[-2], self.seq_chunk):
                phi_q = self.features(q[:, :, a:b], None)[0]
                phi_k = self._key_features(k[:, :, a:b], pad(a, b))
                values = torch.cat([v[:, :, a:b], torch.ones_like(v[:, :, a:b, :1])], dim=-1)
                both, state = decayed_causal_product(phi_q, phi_k, values, None, self.block_size, state=state,
                                                     return_state=True)
                outs.append(both[..., :-1] / nonzero(both[..., -1:]))
        else:  # the key summary over key chunks, then the queries chunk by chunk
            s = z = 0
            for a, b in chunks(k.shape[-2], self.seq_chunk):
                phi_k = self._key_features(k[:, :, a:b], pad(a, b))
                s = s + phi_k.transpose(-1, -2) @ v[:, :, a:b]
                z = z + phi_k.sum(dim=-2)
            for a, b in chunks(q.shape[-2], self.seq_chunk):
                phi_q = self.features(q[:, :, a:b], None)[0]
                outs.append((phi_q @ s) / nonzero(phi_q @ z.unsqueeze(-1)))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk weight matrix phi_q(Q) phi_k(K)^T, masked by the pattern and padding,
        row-normalised, times V."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        if key_padding_mask is not None:
            k = k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        phi_q, phi_k = self.features(q, k)
        weights = (phi_q @ phi_k.transpose(-1, -2)) * dense_visible(
            self, q.shape[-2], k.shape[-2], key_padding_mask, q.device, q.dtype)
        den = weights.sum(dim=-1, keepdim=True)
        return (weights @ v) / nonzero(den)

    # decoding: the state is (S = phi_k^T V (B, H, m, Dv), z = phi_k^T 1 (B, H, m)) --------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(device=k.device, dtype=torch.bool)
        phi_k = self._key_features(k, key_padding_mask)
        return phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=-2)

    def decode_step(self, state, q, k=None, v=None):
        s, z = state
        out_dtype = q.dtype
        q = q.to(s.dtype)
        if k is not None:  # CS: the new token enters the state before its query reads it
            k, v = repeat_kv(k, self.num_heads).to(s.dtype), repeat_kv(v, self.num_heads).to(s.dtype)
            phi_k = self.features(None, k)[1]
            s = s + phi_k.transpose(-1, -2) @ v
            z = z + phi_k.sum(dim=-2)
        phi_q = self.features(q, None)[0]
        out = (phi_q @ s) / nonzero(phi_q @ z.unsqueeze(-1))
        return out.to(out_dtype), (s, z)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        m = self.feature_dim()
        d, h = self.head_dim, self.num_heads
        if self.pattern is Pattern.CS:
            return tiled_product_flops(batch, h, max(lq, lk), m, d + 1, self.block_size) + self.feature_flops(
                batch, max(lq, lk), max(lq, lk))
        # linear_attention: K^T V, Q (K^T 1) as a matvec, Q (K^T V)
        return 2 * batch * h * (lk * m * d + lq * m + lq * m * d) + self.feature_flops(batch, lq, lk)

    def feature_dim(self) -> int:
        raise NotImplementedError

    def feature_flops(self, batch: int, lq: int, lk: int) -> int:
        """Matmul FLOPs of the feature maps (0 unless they contain matmuls)."""
        return 0
