"""ScatterFormer's Scattered Linear Attention (SLA, M23): ReLU-kernel linear attention computed separately
for every segment of a packed, variable-length sequence (voxels of many windows laid out as one sequence),
with the segment-wise chunked algorithm that needs no padding to a common window length."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.kv_cache import check_step_inputs
from cab.attention.engine.prepare import compute_dtype, nonzero, prepare
from cab.patterns import Pattern, attention_mask, segment_runs
from cab.registry import register_attention


def _normalise(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    """num / (den + eps); with eps == 0 a zero normaliser (no visible key, or phi(q) = 0) gives 0."""
    if eps > 0:
        return num / (den + eps)
    return num / nonzero(den)


def _carried(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, rc: torch.Tensor,
             ) -> "tuple[torch.Tensor, torch.Tensor]":
    """(numerator, normaliser) that each query gets from the keys of *earlier chunks* of its own segment.

    qc, kc (B, H, N, C, m), vc (B, H, N, C, Dv), rc (B, N, C) segment runs (non-decreasing along the
    sequence, or non-increasing: only equality is used). The state entering chunk c is the sum of phi(k) v^T
    over the keys before chunk c that lie in the segment of chunk c-1's last position; it continues from
    chunk c-1's own entering state only when chunk c-1 lies wholly in that segment (segments are
    contiguous), else it restarts from chunk c-1's tail. A query of chunk c uses it when it belongs to that
    same segment.
    """
    b, h, n, c, m = qc.shape
    last = rc[..., -1]  # (B, N) the segment of each chunk's last position
    tail = (rc == last[..., None]).to(kc.dtype)[:, None, :, :, None]  # (B, 1, N, C, 1)
    tail_k = kc * tail
    tail_kv = tail_k.transpose(-1, -2) @ vc  # (B, H, N, m, Dv): each chunk's keys in its last segment
    tail_z = tail_k.sum(dim=-2)  # (B, H, N, m)
    # keep[c] = 1 when chunk c continues the segment of chunk c-1's last position to its own end
    keep = torch.zeros_like(last, dtype=kc.dtype)
    keep[:, 1:] = (last[:, 1:] == last[:, :-1]).to(kc.dtype)
    keep = keep[:, None, :, None]  # (B, 1, N, 1)
    states, norms = [], []
    kv = tail_kv.new_zeros(b, h, tail_kv.shape[-2], tail_kv.shape[-1])
    z = tail_z.new_zeros(b, h, m)
    for i in range(n):  # sequential over chunks: O(L / C) small additions
        states.append(kv)
        norms.append(z)
        kv = tail_kv[:, :, i] + keep[:, :, i, :, None] * kv
        z = tail_z[:, :, i] + keep[:, :, i] * z
    entering_kv = torch.stack(states, dim=2)  # (B, H, N, m, Dv)
    entering_z = torch.stack(norms, dim=2)  # (B, H, N, m)
    previous_last = torch.full_like(last, -1)
    previous_last[:, 1:] = last[:, :-1]
    uses = (rc == previous_last[..., None]).to(qc.dtype)[:, None, :, :, None]  # (B, 1, N, C, 1)
    q_used = qc * uses
    return q_used @ entering_kv, q_used @ entering_z.unsqueeze(-1)


def segmented_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor,
                               causal: bool, chunk_size: int = 64, eps: float = 0.0) -> torch.Tensor:
    """The normalised output of `segmented_linear_parts` (see there)."""
    num, den = segmented_linear_parts(phi_q, phi_k, v, runs, causal, chunk_size)
    return _normalise(num, den, eps)


def segmented_linear_parts(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, runs: torch.Tensor,
                           causal: bool, chunk_size: int = 64) -> "tuple[torch.Tensor, torch.Tensor]":
    """Feature-map linear attention restricted to segments, in chunks: query i uses the keys j of its own
    segment (j <= i when causal), out_i = phi(q_i) S / (phi(q_i) z + eps) with S, z the sums of
    phi(k_j) v_j^T and phi(k_j) over those keys.

    phi_q, phi_k (B, H, L, m) non-negative (padded keys zero), v (B, H, L, Dv), runs (B, L) non-decreasing
    segment index (cab.patterns.segment_runs). Within a chunk of C positions the (C x C) weight block is
    masked by "same segment" (and the triangle when causal); across chunks each query picks up the state
    carried from earlier chunks of its segment (and, noncausal, the state carried back from later chunks,
    computed on the reversed sequence). Time O(L (C + m) Dv), memory O(L (C + m Dv / C)); no L x L tensor.
    Returns (numerator (B, H, L, Dv), normaliser (B, H, L, 1)).
    """
    b, h, length, m = phi_q.shape
    dv = v.shape[-1]
    pad = (-length) % chunk_size
    if pad:
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
        runs = torch.cat([runs, (runs[:, -1:] + 1).expand(b, pad)], dim=1)  # the padding is a segment of its own
    n = (length + pad) // chunk_size

    def chunks(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:2], n, chunk_size, x.shape[-1])

    qc, kc, vc = chunks(phi_q), chunks(phi_k), chunks(v)
    rc = runs.reshape(b, n, chunk_size)
    same = rc[..., :, None] == rc[..., None, :]  # (B, N, C, C)
    if causal:
        same = same & torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=same.device).tril()
    weights = (qc @ kc.transpose(-1, -2)) * same[:, None].to(qc.dtype)  # (B, H, N, C, C)
    num = weights @ vc
    den = weights.sum(dim=-1, keepdim=True)
    carried_num, carried_den = _carried(qc, kc, vc, rc)
    num, den = num + carried_num, den + carried_den
    if not causal:  # the keys of later chunks of the same segment: the same carry on the reversed sequence
        flip = lambda x: x.flip(dims=(2, 3))  # noqa: E731 - reverse the chunks and the positions within them
        back_num, back_den = _carried(flip(qc), flip(kc), flip(vc), rc.flip(dims=(1, 2)))
        num, den = num + flip(back_num), den + flip(back_den)
    num = num.reshape(b, h, n * chunk_size, dv)[:, :, :length]
    return num, den.reshape(b, h, n * chunk_size, 1)[:, :, :length]


@dataclass(frozen=True)
class LinearState:
    """Decoding state of a (non-segmented) linear attention: S = sum phi(k) v^T (B, H, m, Dv) and
    z = sum phi(k) (B, H, m) over the tokens so far (CS) or the whole memory (CC)."""

    kv: torch.Tensor
    z: torch.Tensor


@register_attention(
    "scattered_linear", patterns=("NS", "CS"), family="linear", exact=False, mechanism="M23",
    citation="He et al., ScatterFormer: Efficient Voxel Transformer with Scattered Linear Attention, ECCV 2024",
    unsupported={
        "NC": "segment-wise attention segments one sequence; cross attention would need a query and a key "
              "segmentation, which the segment_ids contract (one (B, L) id tensor) does not express — without "
              "segments it is plain ReLU linear attention",
        "CC": "segment-wise attention segments one sequence; cross attention would need a query and a key "
              "segmentation, which the segment_ids contract (one (B, L) id tensor) does not express",
    },
)
class ScatteredLinearAttention(Attention):
    """Scattered Linear Attention (ScatterFormer, He et al. 2024, Sec. 3.2): linear attention with the
    ReLU kernel over each window's voxels, the windows packed as one variable-length sequence.

    Math (the paper's SLA and the official implementation): phi(x) = ReLU(x); per segment w,
    S_w = sum_{j in w} phi(k_j) v_j^T and z_w = sum_{j in w} phi(k_j); a query i of segment w outputs
    phi(q_i)^T S_w / (phi(q_i)^T z_w + eps) with eps = 1e-6 as in the released code. Segments come from the
    contract's `segment_ids` (B, L) (runs of equal consecutive ids, see cab.patterns.segment_runs); without
    them the whole sequence is one segment. The paper's attention is noncausal (NS); CS is the prefix form
    within each segment (query i uses the keys j <= i of its own segment), bottom-right aligned when Lq != Lk
    (then without segments).

    Efficient form (`segmented_linear_attention`): chunks of `chunk_size` positions; inside a chunk an
    explicit (C x C) block masked by "same segment" (and causality), across chunks a state carried through
    the chunks of a segment (ScatterFormer's chunk-wise pre-computation of key-value products, here for
    segments crossing chunk boundaries in any way), plus for NS the same carried backwards. No L x L tensor
    and no padding of segments to a common length. Noncausal without segments uses the global sums.

    Non-differentiable points: ReLU at 0 (PyTorch's subgradient 0). Decoding (CS) keeps (S, z) of the prefix
    (O(m Dv) per head, independent of the length); it knows no segments.
    """

    complexity = {"time": 1, "memory": 1}
    supports_segments = True

    def __init__(self, pattern, num_heads, head_dim, eps: float = 1e-6, chunk_size: int = 64):
        super().__init__(pattern, num_heads, head_dim)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.eps = eps
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, chunk_size={self.chunk_size}"

    def _features(self, q, k, key_padding_mask):
        phi_q, phi_k = F.relu(q), F.relu(k)
        if key_padding_mask is not None:
            phi_k = phi_k.masked_fill(key_padding_mask.bool()[:, None, :, None], 0.0)
        return phi_q, phi_k

    def forward(self, q, k, v, key_padding_mask=None, *, segment_ids=None):
        segment_ids = self.segments(segment_ids, q, k)
        q, k, v, key_padding_mask, drop, out_dtype = prepare(self, q, k, v, key_padding_mask)
        phi_q, phi_k = self._features(q, k, key_padding_mask)
        if segment_ids is None and self.pattern is Pattern.NS:
            num = phi_q @ (phi_k.transpose(-1, -2) @ v)
            den = phi_q @ phi_k.sum(dim=-2).unsqueeze(-1)
            out = _normalise(num, den, self.eps)
        else:
            runs = segment_runs(segment_ids) if segment_ids is not None else \
                torch.zeros(q.shape[0], q.shape[-2], dtype=torch.long, device=q.device)
            out = segmented_linear_attention(phi_q, phi_k, v, runs, self.pattern is Pattern.CS, self.chunk_size,
                                             self.eps)
        return out[:, :, drop:].to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None, *, segment_ids=None):
        """The explicit Lq x Lk kernel matrix ReLU(Q) ReLU(K)^T masked by the pattern, the padding and the
        segments, row-normalised (plus eps), times V."""
        segment_ids = self.segments(segment_ids, q, k)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        visible = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device, segment_ids)
        weights = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * visible
        return _normalise(weights @ v, weights.sum(dim=-1, keepdim=True), self.eps)

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """Matmul FLOPs of forward without segments: NS the global products; CS the chunked form (the
        padded length N*C: intra-chunk blocks, tail states, carried states)."""
        bh, m, dv = batch * self.num_heads, self.head_dim, self.head_dim
        if self.pattern is Pattern.NS:
            return 2 * bh * (lk * m * dv + lq * m * dv + lq * m)
        length = max(lq, lk)
        c = self.chunk_size
        padded = -(-length // c) * c
        return 2 * bh * padded * (c * m + c * dv + m * dv + m * dv + m)

    # decoding (CS) ------------------------------------------------------------------------------------

    def decode_init(self, k, v, key_padding_mask=None, capacity=None):
        if self.pattern is not Pattern.CS:
            raise ValueError(f"incremental decoding applies to CS, not {self.pattern.value}")
        dtype = compute_dtype(k.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        _, phi_k = self._features(k, k, key_padding_mask)
        return LinearState(phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=-2))

    def decode_step(self, state, q, k=None, v=None):
        check_step_inputs(self, k, v)
        dtype = compute_dtype(q.dtype)
        k, v = repeat_kv(k, self.num_heads).to(dtype), repeat_kv(v, self.num_heads).to(dtype)
        phi_q, phi_k = F.relu(q.to(dtype)), F.relu(k)
        kv = state.kv + phi_k.transpose(-1, -2) @ v
        z = state.z + phi_k[:, :, 0]
        out = _normalise(phi_q @ kv, phi_q @ z.unsqueeze(-1), self.eps)
        return out.to(q.dtype), LinearState(kv, z)
