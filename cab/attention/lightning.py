"""Lightning Attention (TransNormerLLM's decayed linear attention, M8) with Lightning Attention-2's tiled
forward and hand-written tiled backward (M9): one operator, one attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.masks import query_offset
from cab.attention.engine.prefix_sums import (
    DEFAULT_BLOCK,
    SEQ_CHUNK,
    chunks,
    decayed_causal_product,
    tiled_product_flops,
)
from cab.attention.engine.prepare import compute_dtype, prepare, zero_padded
from cab.attention.kernels import resolve_backend
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention

ACTIVATIONS = ("silu", "identity")
DECAYS = ("tnl", "none")
BACKENDS = ("auto", "torch", "triton")
NORM_EPS = 1e-6


def tnl_slopes(num_heads: int) -> "list[float]":
    """ALiBi's geometric head slopes (Press et al. 2022), which TransNormerLLM uses as decay rates: for a
    power of two n, 2^(-8/n), 2^(-16/n), ...; otherwise those of the nearest lower power of two followed by
    every other slope of the next power of two."""
    def power_of_two(n: int) -> "list[float]":
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + tnl_slopes(2 * lower)[0::2][: num_heads - lower]


def lightning_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: "torch.Tensor | None",
                              block_size: int = DEFAULT_BLOCK, tiled_backward: bool = True,
                              state: "torch.Tensor | None" = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """The inner operator of Lightning Attention, pure PyTorch: out_i = sum_{j<=i} lambda_h^(i-j) (q_i.k_j) v_j.

    q, k: (B, H, L, Dk), already feature-mapped, padded keys zeroed; v: (B, H, L, Dv); decay: (H,) per-head
    lambda in (0, 1]; causal with Lq == Lk (callers align). Returns (B, H, L, Dv) in q's dtype, without the
    output normalisation. Intra-block: the masked, decayed (C x C) quadratic form; inter-block: the
    recurrent state KV <- lambda^C KV + (lambda^(C-1-j) K_t)^T V_t (no cumulative sum). With
    tiled_backward the gradient is Lightning Attention-2's hand-written tiled backward, which stores only
    q, k, v. `state` (B, H, Dk, Dv, zeros when None) is the decayed sum phi(k) v^T of earlier keys; returns
    (out, the state after the last position), L being a multiple of block_size except for a sequence's
    last chunk. backend="triton" replaces it with cab.attention.kernels.linear.causal_linear_attention."""
    return decayed_causal_product(q, k, v, decay, block_size, tiled_backward, state=state, return_state=True)


@register_attention(
    "lightning", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False, mechanism="M8,M9",
    citation="Qin et al., Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention "
    "(TransNormerLLM), ICML 2024; Qin et al., Lightning Attention-2: A Free Lunch for Handling Unlimited "
    "Sequence Lengths in Large Language Models, arXiv 2024",
)
class LightningAttention(Attention):
    """TransNormerLLM's NormAttention with exponential decay, computed the Lightning way.

    Math (Lightning Attention Eq. 1-4 / TNL Sec. 3): with phi = swish (TNL's activation on q and k) and a
    per-head decay lambda_h, O = Norm([(phi(Q) phi(K)^T) * M_lambda] V), M_lambda[i, j] = lambda^(i - j) for
    j <= i — no softmax, no denominator. Norm is TNL's SimpleRMSNorm without weight, x / rms(x), taken per
    token over all heads together (TNL normalises the concatenated heads before its gate and output
    projection; gate and projections belong to the backbone). Decay ("tnl"): lambda_h = exp(-s_h), s_h
    TNL's ALiBi-style slopes scaled by (1 - layer_fraction + 1e-5), where layer_fraction = l / (L - 1)
    places the layer in the stack (0 = first layer, the strongest decay); "none": lambda = 1.

    Computation: causal self attention runs in blocks of `block_size` — the intra-block quadratic masked,
    decayed form and the inter-block recurrent state (no cumsum, Lightning Attention Alg. 1). M9
    (Lightning Attention-2) is the tiled forward AND backward of this same operator, so both are one
    attention: `tiled_backward=True` (default) uses a torch.autograd.Function whose hand-written backward
    sweeps the blocks again (dQ forward with the KV state, dK and dV in reverse with a dKV state) and keeps
    only q, k, v; False lets autograd record the block loop (Lightning-1 behaviour, a state per block kept).

    Patterns: CS is bottom-right aligned when Lq != Lk (query i at key position i + Lk - Lq). NS uses the
    symmetric decay lambda^|i - j| (TNL is causal; noncausal is "trivial" per the papers): a forward and a
    reversed causal pass minus the doubled diagonal. NC and CC have no relative position between a query
    and a key, so they run without decay (lambda = 1): O = Norm(phi(Q) (phi(K)^T V)); no query reads
    another query, so CC is sound. Not included: TNL's LRPE (a positional encoding) and its output gate.
    Padded keys have zero features (they still occupy positions for the decay). A row that sees no key
    outputs 0. Incremental decoding (CS, CC): the state is the (Dk x Dv) matrix per head, updated
    KV <- lambda KV + phi(k) v^T per token. `backend`: "torch" (the tiled PyTorch operator above), "triton"
    (cab's kernel, cab.attention.kernels.linear.causal_linear_attention with log-decay -log(lambda), run in
    the input dtype over the whole sequence; CUDA, or CPU under TRITON_INTERPRET=1), "auto" (default:
    triton on CUDA for fp16/bf16/fp32 when triton imports, torch otherwise); self.backend is the one that
    ran.
    """

    mixes_heads = True  # the output norm (SimpleRMSNorm) runs per token over all heads together

    def __init__(self, pattern, num_heads, head_dim, block_size: int = DEFAULT_BLOCK, activation: str = "silu",
                 decay: str = "tnl", layer_fraction: float = 0.0, norm: bool = True, tiled_backward: bool = True,
                 backend: str = "auto"):
        super().__init__(pattern, num_heads, head_dim)
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        if not 0.0 <= layer_fraction <= 1.0:
            raise ValueError(f"layer_fraction must be in [0, 1], got {layer_fraction}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.block_size, self.activation, self.decay_kind = block_size, activation, decay
        self.layer_fraction, self.norm, self.tiled_backward = layer_fraction, norm, tiled_backward
        self.requested_backend = backend
        self.backend = "torch" if backend == "auto" else backend
        self.seq_chunk = SEQ_CHUNK  # tokens per chunk of the sequence loop (a multiple of block_size)
        if SEQ_CHUNK % block_size:
            self.seq_chunk = block_size * max(1, SEQ_CHUNK // block_size)
        if decay == "tnl":
            slopes = torch.tensor(tnl_slopes(num_heads), dtype=torch.float64) * (1.0 - layer_fraction + 1e-5)
            lambdas = torch.exp(-slopes)
        else:
            lambdas = torch.ones(num_heads, dtype=torch.float64)
        self.register_buffer("lambdas", lambdas, persistent=False)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block_size={self.block_size}, activation={self.activation}, "
                f"decay={self.decay_kind}, layer_fraction={self.layer_fraction}, norm={self.norm}, "
                f"tiled_backward={self.tiled_backward}, backend={self.requested_backend}")

    def _decay(self, dtype) -> "torch.Tensor | None":
        """Per-head lambda (H,), or None where no decay applies (cross patterns or decay='none')."""
        if self.cross or self.decay_kind == "none":
            return None
        return self.lambdas.to(dtype)

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if self.activation == "silu" else x

    def _normalize(self, out: torch.Tensor) -> torch.Tensor:
        """SimpleRMSNorm per token over all heads: (B, H, L, D) -> same shape."""
        if not self.norm:
            return out
        ms = out.pow(2).mean(dim=(1, 3), keepdim=True)
        return out * torch.rsqrt(ms + NORM_EPS)

    def _inner(self, q, k, v, decay, state=None, kernel_dtype=None):
        if self.backend == "triton":  # the whole sequence in one call (no carried state), in kernel_dtype
            from cab.attention.kernels.linear import causal_linear_attention

            log_decay = None if decay is None else -torch.log(decay.to(torch.float64)).to(torch.float32)
            dtype = kernel_dtype or q.dtype
            out = causal_linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), log_decay, block_c=self.block_size)
            return out.to(q.dtype), None
        return lightning_attention_torch(q, k, v, decay, self.block_size, self.tiled_backward, state)

    def forward(self, q, k, v, key_padding_mask=None):
        """Over chunks of `seq_chunk` tokens (the recurrent state carried across chunks, so no temporary
        spans the sequence): CS one causal sweep; NS with decay a forward sweep plus a reversed sweep
        (chunks taken from the end, each flipped) minus the doubled diagonal; otherwise the key summary
        phi(K)^T V, then the queries chunk by chunk."""
        self.backend = resolve_backend(self.requested_backend, "lightning", q.device, q.dtype)
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        decay = self._decay(q.dtype)
        length = q.shape[-2]
        size = max(1, length) if self.backend == "triton" else self.seq_chunk

        def features(a, b):
            pad = None if key_padding_mask is None else key_padding_mask[:, a:b]
            return self._phi(q[:, :, a:b]), zero_padded(self._phi(k[:, :, a:b]), pad)

        outs = []
        if self.pattern is Pattern.CS or (self.pattern is Pattern.NS and decay is not None):
            state = None
            for a, b in chunks(length, size):
                phi_q, phi_k = features(a, b)
                out, state = self._inner(phi_q, phi_k, v[:, :, a:b], decay, state, out_dtype)
                outs.append(out)
            if self.pattern is Pattern.NS:  # the same sweep from the end; full chunks first
                state = None
                for index, b in enumerate(range(length, 0, -size)):
                    a = max(0, b - size)
                    phi_q, phi_k = features(a, b)
                    ahead, state = self._inner(phi_q.flip(-2), phi_k.flip(-2), v[:, :, a:b].flip(-2), decay, state,
                                               out_dtype)
                    diagonal = (phi_q * phi_k).sum(dim=-1, keepdim=True) * v[:, :, a:b]
                    outs.append(ahead.flip(-2) - diagonal)
                forward_part, backward_part = outs[:len(outs) // 2], outs[len(outs) // 2:][::-1]
                forward_out = torch.cat(forward_part, dim=-2) if len(forward_part) > 1 else forward_part[0]
                backward_out = torch.cat(backward_part, dim=-2) if len(backward_part) > 1 else backward_part[0]
                return self._normalize(forward_out + backward_out).to(out_dtype)
        else:
            kv = 0
            for a, b in chunks(k.shape[-2], size):
                pad = None if key_padding_mask is None else key_padding_mask[:, a:b]
                kv = kv + zero_padded(self._phi(k[:, :, a:b]), pad).transpose(-1, -2) @ v[:, :, a:b]
            outs = [self._phi(q[:, :, a:b]) @ kv for a, b in chunks(length, size)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        return self._normalize(out[:, :, drop:]).to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit weights (phi(Q) phi(K)^T) * lambda^|p_i - j| (p_i = i, or i + Lk - Lq in CS; no decay
        for cross patterns), masked by the pattern and padding, times V, then the RMS norm."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        weights = self._phi(q) @ self._phi(k).transpose(-1, -2)
        decay = self._decay(q.dtype)
        if decay is not None:
            offset = query_offset(self.pattern, lq, lk)
            rows = torch.arange(lq, device=q.device, dtype=q.dtype)[:, None] + offset
            cols = torch.arange(lk, device=q.device, dtype=q.dtype)[None, :]
            weights = weights * decay.reshape(-1, 1, 1) ** (rows - cols).abs()
        weights = weights * attention_mask(self.pattern, lq, lk, key_padding_mask, q.device).to(q.dtype)
        return self._normalize(weights @ v)

    # incremental decoding: the state is KV = sum_j lambda^(t - j) phi(k_j) v_j^T, (B, H, Dk, Dv) ---------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(device=k.device, dtype=torch.bool)
        phi_k = zero_padded(self._phi(k), key_padding_mask)
        decay = self._decay(dtype)
        if decay is not None:  # CS: key j of L0 has age L0 - 1 - j
            ages = torch.arange(k.shape[-2] - 1, -1, -1, device=k.device, dtype=dtype)
            phi_k = phi_k * (decay.reshape(-1, 1) ** ages).unsqueeze(-1)
        return phi_k.transpose(-1, -2) @ v

    def decode_step(self, state, q, k=None, v=None):
        out_dtype = q.dtype
        kv = state
        if k is not None:
            k, v = repeat_kv(k, self.num_heads).to(kv.dtype), repeat_kv(v, self.num_heads).to(kv.dtype)
            decay = self._decay(kv.dtype)
            if decay is not None:
                kv = decay.reshape(1, -1, 1, 1) * kv
            kv = kv + self._phi(k).transpose(-1, -2) @ v
        out = self._phi(q.to(kv.dtype)) @ kv
        return self._normalize(out).to(out_dtype), kv

    # costs -----------------------------------------------------------------------------------------------

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        d, h = self.head_dim, self.num_heads
        if self.pattern is Pattern.CS:
            return tiled_product_flops(batch, h, max(lq, lk), d, d, self.block_size)
        if self.pattern is Pattern.NS and self._decay(torch.float64) is not None:
            return 2 * tiled_product_flops(batch, h, lq, d, d, self.block_size)
        return 2 * batch * h * (lk * d * d + lq * d * d)

    def peak_memory_estimate(self, batch, lq, lk, kv_heads, mode, dtype):
        size = torch.empty((), dtype=compute_dtype(dtype)).element_size()
        d, h, length = self.head_dim, self.num_heads, max(lq, lk)
        tokens = batch * h * length * d * size
        factor = 8 if mode == "fwd" or mode == "fwd_infer" else 16
        return factor * tokens + 4 * batch * h * self.block_size * self.block_size * size

    complexity = {"time": 1, "memory": 1}
