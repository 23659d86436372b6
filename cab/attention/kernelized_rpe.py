"""Kernelized attention with relative positional encoding: Performer random features whose kernel matrix
is re-weighted entry-wise by exp(b_{j-i}), a Toeplitz matrix, so every key summary is a Toeplitz
matrix-vector product computed with the FFT in O(L log L)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.convolution import toeplitz_products
from cab.attention.engine.feature_map import orthogonal_gaussian_features, projections, shifted_exp
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.masks import query_offset
from cab.attention.engine.prefix_sums import with_ones
from cab.attention.engine.prepare import compute_dtype, grouped_compute, key_weights, nonzero, prepare
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention

# the FFT's round-off is relative to the largest entry of a whole transform and lands on every position: in
# float32 it reaches ~1e-4 of a row's output and lets later keys move earlier rows (CS) by as much, growing
# with the length; in float64 it is ~1e-12, so the forward computes in float64 and casts back
_FFT_DTYPE = torch.float64

_CROSS = ("relative positions j - i need queries and keys on one position axis; two different sequences "
          "share none, so the Toeplitz bias would be an arbitrary alignment")


def _alibi_slopes(heads: int) -> torch.Tensor:
    """Geometric per-head slopes 2^(-8 h / H), h = 1..H (Press et al.'s ALiBi), the bias initialisation."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)


@register_attention(
    "kernelized_rpe", patterns=("NS", "CS"), family="linear", exact=False, mechanism="M19",
    citation="Luo et al., Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding, "
    "NeurIPS 2021",
    unsupported={"NC": _CROSS, "CC": _CROSS},
)
class KernelizedRPEAttention(Attention):
    """Kernelized attention with RPE (paper Sec. 3, Eq. 6-8; [BG]):

        O_i = sum_j exp(b_{j-i}) phi(q_i).phi(k_j) v_j / sum_j exp(b_{j-i}) phi(q_i).phi(k_j)

    with phi Performer's positive orthogonal random features (`num_features` m per head, seeded, fixed;
    see `performer`) and b a learned bias per head and relative offset r = j - i, clipped to
    [-max_distance, max_distance] as in Shaw et al.'s relative positions ([EJ] `max_distance` = 128;
    the clip keeps the matrix Toeplitz and makes decoding O(max_distance)). Initialisation [EJ]: b_r =
    -slope_h |r| with ALiBi's geometric per-head slopes (a distance decay the training can reshape).

    Efficient form (paper Sec. 3.2): the numerator is phi(q_i) . sum_j C_ij phi(k_j) [v_j, 1]^T with C
    Toeplitz, so for each of the m (d_v + 1) channels sum_j C_ij x_j is one Toeplitz matrix-vector product,
    done by FFT (zero-padded circular convolution of length >= Lq + Lk - 1): O(m d L log L) time, O(m d L)
    memory, in groups of features to bound the peak. The forward computes in float64 whatever the input
    dtype (the output is cast back): an FFT's round-off is relative to the largest entry of the whole
    transform and spreads over every position, so in float32 a row whose sums are small relative to
    others is off by ~1e-4 of its scale (growing with L) and, under CS, later keys move earlier rows by as
    much; float64 brings both to the input rounding (float32 vs the float64 reference ~1e-7), at ~2-3x
    the time of a float32 FFT (B = 1, H = 4, D = 64, L = 1024 and 4096, one CPU thread). CS sets C_ij = 0
    for j > i (b_r = -inf for r > 0; C stays Toeplitz) and is bottom-right aligned when Lq != Lk (query i
    sits at key position i + Lk - Lq); NS with Lq != Lk puts query i at position i. The same
    stabilisation as `performer`: each query row's log-features are shifted by their maximum, all keys'
    by one detached constant per (batch, head), the bias by its maximum; every shift cancels exactly.
    Padded keys get zero features; a row with no visible key outputs 0. NC/CC are unsupported (see the
    reason).

    Decoding (CS) keeps the keys older than max_distance in one accumulated state (their bias is the
    clipped b_{-max_distance}) and the last max_distance + 1 keys' log-features and values in a ring
    buffer: O(max_distance m d) per step, state independent of the length.
    """

    complexity = {"time": 1, "memory": 1}  # O(L log L) time

    def __init__(self, pattern, num_heads, head_dim, num_features: int = 16, max_distance: int = 128,
                 seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if num_features < 1 or max_distance < 1:
            raise ValueError(f"num_features and max_distance must be positive, got {num_features}, {max_distance}")
        self.num_features, self.max_distance, self.seed = num_features, max_distance, seed
        generator = torch.Generator().manual_seed(seed)
        omega = torch.stack([orthogonal_gaussian_features(num_features, head_dim, generator) for _ in range(num_heads)])
        self.register_buffer("omega", omega.to(torch.get_default_dtype()))
        offsets = torch.arange(-max_distance, max_distance + 1, dtype=torch.float64).abs()
        bias = -_alibi_slopes(num_heads)[:, None] * offsets  # (H, 2D + 1), index r + D
        self.bias = nn.Parameter(bias.to(torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_features={self.num_features}, max_distance={self.max_distance}, "
                f"seed={self.seed}")

    # pieces ---------------------------------------------------------------------------------------------

    def _log_features(self, x: torch.Tensor, query: bool) -> torch.Tensor:
        """log phi(x) up to a per-row constant for queries: w^T x' (- |x'|^2 / 2 for keys), x' = x / d^(1/4)."""
        log = projections(x, self.omega.to(x.dtype))
        if query:
            return log
        return log - (0.5 / x.shape[-1] ** 0.5) * (x * x).sum(dim=-1, keepdim=True)

    def _offset_weights(self, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """exp(b_r - max b) for relative offsets r = j - i (any shape, integer), zero for r > 0 in CS."""
        bias = self.bias.to(dtype)
        bias = bias - bias.detach().amax(dim=-1, keepdim=True)
        index = offsets.clamp(-self.max_distance, self.max_distance) + self.max_distance
        weights = torch.exp(bias[:, index])  # (H, *offsets.shape)
        if self.causal:
            weights = weights * (offsets <= 0).to(dtype)
        return weights

    def _features(self, q, k, key_padding_mask):
        log_q = self._log_features(q, query=True)
        phi_q = torch.exp(log_q - log_q.detach().amax(dim=-1, keepdim=True))
        log_k = self._log_features(k, query=False)
        return phi_q, shifted_exp(log_k, key_padding_mask, dim=(-2, -1))

    def forward(self, q, k, v, key_padding_mask=None):
        dtype = _FFT_DTYPE  # float64 whatever the inputs: see the class docstring
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask, dtype)
        lq, lk = q.shape[-2], k.shape[-2]
        phi_q, phi_k = self._features(q, k, key_padding_mask)
        # kernel over offsets i - j = -(lk-1) .. lq-1, i.e. r = j - i = lk-1 .. -(lq-1)
        offsets = -torch.arange(-(lk - 1), lq, device=q.device)
        kernel = self._offset_weights(offsets, dtype)  # (H, lq + lk - 1)
        v1 = with_ones(v)
        group = max(1, 512 // v1.shape[-1])  # features per FFT pass: bounds the (B, H, L, channels) buffers
        # channels-first (B, H, channels, L) buffers, so the FFTs run along contiguous rows rather than the
        # strided sequence axis (measured 1.0-1.1x on the whole forward: the float64 FFTs themselves dominate)
        phi_kt, v1t, phi_qt = phi_k.transpose(-1, -2), v1.transpose(-1, -2), phi_q.transpose(-1, -2)
        both = None
        for start in range(0, self.num_features, group):
            stop = min(self.num_features, start + group)
            xt = (phi_kt[..., start:stop, None, :] * v1t.unsqueeze(-3)).flatten(-3, -2)  # (B, H, g (dv + 1), Lk)
            yt = toeplitz_products(xt.transpose(-1, -2), kernel, lq).transpose(-1, -2)
            part = (phi_qt[..., start:stop, None, :] * yt.unflatten(-2, (stop - start, v1.shape[-1]))).sum(dim=-3)
            both = part if both is None else both + part  # (B, H, dv + 1, Lq)
        out = (both[..., :-1, :] / nonzero(both[..., -1:, :])).transpose(-1, -2)
        # rows that see no real key: the FFT leaves round-off (not exact zeros) in their sums
        real = key_weights(key_padding_mask, q.shape[0], lk, q.device, dtype)[..., 0]  # (B|1, 1, Lk)
        seen = real.cumsum(dim=-1)[..., :lq] if self.causal else real.sum(dim=-1, keepdim=True)
        out = out * (seen > 0).unsqueeze(-1).to(dtype)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The explicit Lq x Lk matrix exp(b_{j-i}) phi(q_i).phi(k_j) (unstabilised features, with their
        1/sqrt(m)), masked by the pattern and padding, row-normalised, times V."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        lq, lk = q.shape[-2], k.shape[-2]
        ratio = 1.0 / math.sqrt(self.num_features)
        scale = q.shape[-1] ** -0.25
        omega = self.omega.to(q.dtype)
        phi_q = ratio * torch.exp((q * scale) @ omega.transpose(-1, -2)
                                  - 0.5 * ((q * scale) ** 2).sum(-1, keepdim=True))
        phi_k = ratio * torch.exp((k * scale) @ omega.transpose(-1, -2)
                                  - 0.5 * ((k * scale) ** 2).sum(-1, keepdim=True))
        shift = query_offset(self.pattern, lq, lk)  # query i at key position i + shift
        rel = torch.arange(lk, device=q.device)[None, :] - (torch.arange(lq, device=q.device)[:, None] + shift)
        bias = self.bias.to(q.dtype)[:, rel.clamp(-self.max_distance, self.max_distance) + self.max_distance]
        kernel = (phi_q @ phi_k.transpose(-1, -2)) * torch.exp(bias)
        kernel = kernel * attention_mask(self.pattern, lq, lk, key_padding_mask, q.device)
        den = kernel.sum(dim=-1, keepdim=True)
        return (kernel @ v) / nonzero(den)

    # decoding -------------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        """CS state after the context: {far: sum over keys older than max_distance of exp(log phi(k) -
        shift) [v, 1]^T (B, H, m, dv + 1), shift: the running maximum of the keys' log-features (B, H, 1, 1),
        ring_log (B, H, D + 1, m) and ring_v (B, H, D + 1, dv + 1): the last D + 1 keys, token t in slot
        t mod (D + 1), -inf log-features for absent or padded ones; count}."""
        if self.pattern is not Pattern.CS:
            raise ValueError(f"incremental decoding applies to CS, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        batch, heads, length, _ = k.shape
        d = self.max_distance
        log_k = self._log_features(k, query=False)
        if key_padding_mask is not None:
            log_k = log_k.masked_fill(key_padding_mask.bool()[:, None, :, None], float("-inf"))
        if length:
            shift = log_k.amax(dim=(-2, -1), keepdim=True)
        else:
            shift = k.new_full((batch, heads, 1, 1), float("-inf"))
        safe = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        v1 = with_ones(v)
        old = max(0, length - d)  # keys 0 .. length-d-1 are `far`
        far = torch.exp(log_k[:, :, :old] - safe).transpose(-1, -2) @ v1[:, :, :old]
        ring_log = k.new_full((batch, heads, d + 1, self.num_features), float("-inf"))
        ring_v = k.new_zeros(batch, heads, d + 1, v1.shape[-1])
        slots = torch.arange(old, length, device=k.device) % (d + 1)
        ring_log[:, :, slots], ring_v[:, :, slots] = log_k[:, :, old:], v1[:, :, old:]
        return {"far": far, "shift": shift, "ring_log": ring_log, "ring_v": ring_v, "count": length}

    def decode_step(self, state, q, k=None, v=None):
        check_step_inputs(self, k, v)
        q, k, v, out_dtype = grouped_compute(q, k, v)
        dtype = q.dtype
        d, t = self.max_distance, state["count"]
        slots = d + 1
        log_new = self._log_features(k, query=False)  # (B, H, 1, m)
        shift = torch.maximum(state["shift"], log_new.amax(dim=-1, keepdim=True))
        old = torch.where(torch.isfinite(state["shift"]), state["shift"], shift)
        far = state["far"] * torch.exp(old - shift)
        leaving = (t - d) % slots  # token t - d joins `far` (its log-features are -inf when absent)
        far = far + torch.exp(state["ring_log"][:, :, leaving:leaving + 1] - shift).transpose(-1, -2) \
            @ state["ring_v"][:, :, leaving:leaving + 1]
        ring_log, ring_v = state["ring_log"], state["ring_v"]
        ring_log[:, :, t % slots], ring_v[:, :, t % slots] = log_new[:, :, 0], with_ones(v)[:, :, 0]
        # tokens t-d+1 .. t sit in the ring at distance t - j = (t - slot) mod slots; slot `leaving` is far
        distance = (t - torch.arange(slots, device=q.device)) % slots  # (slots,), `leaving` has distance d
        weights = self._offset_weights(-distance, dtype)  # (H, slots)
        weights = weights.masked_fill(distance == d, 0.0)
        recent = (torch.exp(ring_log - shift) * weights[None, :, :, None]).transpose(-1, -2) @ ring_v
        states = recent + self._offset_weights(torch.tensor([-d], device=q.device), dtype)[None, :, :, None] * far
        log_q = self._log_features(q, query=True)
        phi_q = torch.exp(log_q - log_q.amax(dim=-1, keepdim=True))
        both = phi_q @ states  # (B, H, 1, dv + 1)
        out = both[..., :-1] / nonzero(both[..., -1:])
        new = {"far": far, "shift": shift, "ring_log": ring_log, "ring_v": ring_v, "count": t + 1}
        return out.to(out_dtype), new
