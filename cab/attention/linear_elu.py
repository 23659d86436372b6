"""Linear attention with the elu+1 feature map (Katharopoulos et al. 2020), with two backends: PyTorch
(chunked prefix sums) and cab's Triton kernels (`cab.attention.kernels.linear`)."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.feature_map import elu_feature_map
from cab.attention.engine.prefix_sums import pattern_linear_attention
from cab.attention.engine.prepare import compute_dtype, nonzero, prepare
from cab.attention.kernels import resolve_backend
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention

BACKENDS = ("auto", "torch", "triton")
SCHEDULES = ("chunked", "sequential")  # cab.attention.kernels.linear's schedules of the causal kernel


@register_attention(
    "linear_elu", patterns=("NS", "CS", "NC", "CC"), family="linear", exact=False,
    citation="Katharopoulos et al., Transformers are RNNs: Fast Autoregressive Transformers with Linear "
    "Attention, ICML 2020",
)
class LinearEluAttention(Attention):
    """Linear attention (paper Eq. 4-9): out_i = phi(q_i)^T S / phi(q_i)^T z with S = sum_j phi(k_j) v_j^T,
    z = sum_j phi(k_j) over the keys row i sees, phi(x) = elu(x) + 1 applied to each head's q and k (no
    1/sqrt(d) scale: it would cancel only for a linear phi, and the paper uses none).

    Patterns: NS and NC use every real key (NC with Lq != Lk); CC is query-side causal, which a linear
    attention is by construction (each row uses only the key summary); CS uses the prefix sums of keys
    0..i, bottom-right aligned when Lq != Lk (query i sits at key position i + Lk - Lq). Padded keys get
    zero features, and a row with no visible key outputs 0.

    Backends (`backend`): "torch" — the noncausal product phi(Q) (phi(K)^T V), and for CS the chunked
    prefix sums of `cab.attention.functional.causal_linear_attention`; "triton" — cab's kernels
    (`cab.attention.kernels.linear`: the Lightning-2 tiled causal kernel with decay off and the normaliser
    fused, or the K^T V reduction then Q x state), on CUDA, or on CPU under TRITON_INTERPRET=1; "auto"
    (default) — triton on CUDA for float16/bfloat16/float32 inputs when triton imports, torch otherwise.
    `kernel_schedule` picks the causal kernel's schedule ("chunked": entering states first, then all
    blocks in parallel; "sequential": Lightning-2's loop); it does not change the math.
    An explicit "triton" where it cannot run raises. `self.backend` is the backend of the latest call
    (before any call: torch for "auto"), which the bench records. Incremental decoding (CS, CC) carries
    (S, z) and runs in PyTorch for every backend.
    """

    complexity = {"time": 1, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, backend: str = "auto", kernel_schedule: str = "chunked"):
        super().__init__(pattern, num_heads, head_dim)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if kernel_schedule not in SCHEDULES:
            raise ValueError(f"kernel_schedule must be one of {', '.join(SCHEDULES)}, got {kernel_schedule!r}")
        self.kernel_schedule = kernel_schedule
        self.requested_backend = backend
        self.backend = "torch" if backend == "auto" else backend

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.requested_backend}, kernel_schedule={self.kernel_schedule}"

    def _features(self, q, k, key_padding_mask):
        phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask.to(device=k.device, dtype=torch.bool)[:, None, :, None], 0.0)
        return phi_q, phi_k

    def forward(self, q, k, v, key_padding_mask=None):
        backend = resolve_backend(self.requested_backend, "linear_elu", q.device, q.dtype)
        self.backend = backend
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask, q.dtype)
        causal = self.pattern is Pattern.CS
        if backend == "triton":
            from cab.attention.kernels.linear import causal_linear_attention as causal_kernel
            from cab.attention.kernels.linear import noncausal_linear_attention as noncausal_kernel

            work = compute_dtype(q.dtype)
            phi_q, phi_k = self._features(q.to(work), k.to(work), key_padding_mask)
            phi_q, phi_k = phi_q.to(out_dtype), phi_k.to(out_dtype)
            if causal:
                num, den = causal_kernel(phi_q, phi_k, v, with_normaliser=True, schedule=self.kernel_schedule)
            else:
                num, den = noncausal_kernel(phi_q, phi_k, v, with_normaliser=True)
            out = num.to(den.dtype) / nonzero(den).unsqueeze(-1)
        else:
            dtype = compute_dtype(q.dtype)
            phi_q, phi_k = self._features(q.to(dtype), k.to(dtype), key_padding_mask)
            v = v.to(dtype)
            out = pattern_linear_attention(causal, phi_q, phi_k, v)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk weights phi(q_i).phi(k_j), masked by the pattern and padding, row-normalised."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        weights = elu_feature_map(q) @ elu_feature_map(k).transpose(-1, -2)
        weights = weights * attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        return (weights @ v) / nonzero(weights.sum(dim=-1, keepdim=True))

    # incremental decoding ----------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """(S, z): sum of phi(k_j) v_j^T and of phi(k_j) over the given real keys, per query head."""
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        _, phi_k = self._features(k, k, key_padding_mask)
        return phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=-2)

    def decode_step(self, state, q, k=None, v=None):
        kv, z = state
        if k is not None:  # CS: the new token joins the sums (new tensors: the given state stays valid)
            k, v = repeat_kv(k, self.num_heads).to(kv.dtype), repeat_kv(v, self.num_heads).to(kv.dtype)
            phi_k = elu_feature_map(k)
            kv, z = kv + phi_k.transpose(-1, -2) @ v, z + phi_k.sum(dim=-2)
        phi_q = elu_feature_map(q.to(kv.dtype))
        out = (phi_q @ kv) / nonzero(phi_q @ z.unsqueeze(-1))
        return out.to(q.dtype), (kv, z)
