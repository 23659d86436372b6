"""Nystromformer: softmax attention approximated with segment-mean landmarks (the Nystrom method)."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import softmax_scale
from cab.registry import register_attention


def masked_softmax(scores: torch.Tensor, keep: "torch.Tensor | None") -> torch.Tensor:
    """softmax over the last dim restricted to `keep` (None: keep everything); rows with nothing kept are
    all zero (not NaN)."""
    if keep is None:
        return torch.softmax(scores, dim=-1)
    any_kept = keep.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~any_kept, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(~any_kept, 0.0)


def segments(real: torch.Tensor, num_segments: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """(segment id (B, L), segment sizes (B, m)): the n real positions of a row (True in `real`, taken in
    order) cut into m consecutive segments, real position of rank r going to segment floor(r * m / n);
    padded positions get the id m (no segment), so a row's segments do not change when padding is appended.
    Segments are empty when n < m."""
    real = real.bool()
    rank = torch.cumsum(real.long(), dim=-1) - 1
    count = real.sum(dim=-1, keepdim=True).clamp_min(1)
    ids = torch.div(rank * num_segments, count, rounding_mode="floor").masked_fill(~real, num_segments)
    sizes = torch.zeros(real.shape[0], num_segments + 1, dtype=torch.long, device=real.device)
    sizes.scatter_add_(1, ids, torch.ones_like(ids))
    return ids, sizes[:, :num_segments]


def block_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """(B, H, m, D) means of the m equal consecutive blocks of x (B, H, L, D), m dividing L (CAB's pooling)."""
    b, h, length, d = x.shape
    return x.reshape(b, h, m, length // m, d).mean(dim=-2)


def segment_means(x: torch.Tensor, ids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, H, m, D) means of x (B, H, L, D) over each segment (id m: left out); an empty segment is 0.

    When every position is real and m divides L the segments are equal consecutive blocks: a reshape-mean
    (CAB's pooling). Otherwise one (m x L) averaging matrix per batch row, shared by the heads, times x: a
    matmul, where the scatter-add over (B, H, L, D) indices it replaces was 3-8x slower on CPU at L = 4096."""
    b, h, length, d = x.shape
    m = sizes.shape[-1]
    if length % m == 0 and bool((sizes == length // m).all()):
        return block_means(x, m)
    member = ids[:, None, :] == torch.arange(m, device=ids.device)[None, :, None]  # (B, m, L)
    weights = member.to(x.dtype) / sizes.clamp_min(1).to(x.dtype)[:, :, None]
    return weights[:, None] @ x


def iterative_pinv(mat: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (..., n, m) matrix by the paper's iteration (Eq. 16):
    Z_0 = A^T / (||A||_1 ||A||_inf), Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4.

    The initial scale is taken per matrix (lucidrains and CAB take one maximum over the whole batch and
    all heads, which couples the outputs of different batch rows)."""
    abs_mat = mat.abs()
    norm_inf = abs_mat.sum(dim=-1).amax(dim=-1)  # max row sum
    norm_1 = abs_mat.sum(dim=-2).amax(dim=-1)  # max column sum
    scale = (norm_1 * norm_inf).clamp_min(torch.finfo(mat.dtype).tiny)
    z = mat.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(mat.shape[-2], dtype=mat.dtype, device=mat.device)
    for _ in range(iterations):
        az = mat @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register_attention(
    "nystromformer", patterns=("NS", "NC"), family="low-rank", exact=False, version=3,
    citation="Xiong et al., Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention, AAAI 2021",
    unsupported={
        "CS": "segment-mean landmarks pool keys and queries from the whole sequence, so every row would "
        "see the future (no leak-free landmark scheme is implemented)",
        "CC": "query landmarks are means over all queries, so row i would depend on queries after i",
    },
)
class NystromformerAttention(Attention):
    """Nystrom approximation of softmax attention (Xiong et al. 2021, Sec. 3, Eq. 15):

        out = softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V

    with landmarks Q~, K~ the means of `num_landmarks` consecutive segments of the queries and keys,
    scores scaled by 1/sqrt(d), and pinv the paper's iterative Moore-Penrose approximation
    (`pinv_iterations` steps). Cost O(L m d) for m landmarks; nothing L x L is formed.

    Padding: landmarks are means over the real keys only (segments are cut over the real positions,
    so appending padding changes nothing), padded keys are masked out of softmax(Q~ K^T), and in
    self attention the same mask removes padded queries from the query landmarks. Rows whose batch
    entry has no real key output zero. Fewer real keys than landmarks leaves landmarks empty; they are
    masked out (each real key then is its own landmark and the result tends to exact attention).

    Cross attention (NC) pools query landmarks from the query sequence and key landmarks from the key
    sequence. Not causal: landmark pooling mixes the whole sequence into every row.

    Differences from CAB (Shark-NLP/CAB, from mlpen/Nystromformer): CAB divides both q and k by sqrt(d), so
    its scores are q.k / d where the paper's (and cab's) are q.k / sqrt(d). CAB zeroes padded keys but still
    counts them in the landmark means, fixes segments over the padded length, and scales the
    pseudo-inverse's start by one maximum over the whole batch; it switches to exact attention when
    L <= m. Its optional depthwise-convolution residual on V (off by default in CAB) is not included.
    Grouped-query heads share keys through `repeat_kv`.
    """

    def __init__(self, pattern, num_heads, head_dim, num_landmarks: int = 16, pinv_iterations: int = 6):
        super().__init__(pattern, num_heads, head_dim)
        if num_landmarks < 1 or pinv_iterations < 1:
            raise ValueError("num_landmarks and pinv_iterations must be positive")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations

    def _real_positions(self, q, k, key_padding_mask):
        """(real keys (B, Lk), real queries (B, Lq)): in self attention a padded key is a padded query."""
        b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
        if key_padding_mask is None:
            real_k = torch.ones(b, lk, dtype=torch.bool, device=q.device)
        else:
            real_k = ~key_padding_mask.to(device=q.device, dtype=torch.bool)
        if not self.cross and lq <= lk:
            real_q = real_k[:, lk - lq:]  # query i sits at key position i + Lk - Lq
        else:
            real_q = torch.ones(b, lq, dtype=torch.bool, device=q.device)
        return real_k, real_q

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        scale = softmax_scale(q.shape[-1])
        unpadded, m = key_padding_mask is None, self.num_landmarks
        lq, lk = q.shape[-2], k.shape[-2]
        if unpadded and min(lq, lk) >= m and lq % m == 0 and lk % m == 0:
            # every position real, m dividing both lengths: the segments are equal blocks, and no segment
            # ids are needed (their cumsum and scatter were ~12% of the forward at L = 1024 on one thread)
            k_land, q_land = block_means(k, m) * scale, block_means(q, m)
        else:
            real_k, real_q = self._real_positions(q, k, key_padding_mask)
            ids_k, sizes_k = segments(real_k, m)
            ids_q, sizes_q = segments(real_q, m)
            nonempty_k, nonempty_q = sizes_k > 0, sizes_q > 0
            k_land = segment_means(k, ids_k, sizes_k) * scale  # (B, H, m, D), the score scale folded in
            q_land = segment_means(q, ids_q, sizes_q)
        # masks only where something can be masked: padding, or fewer positions than landmarks
        keep_kl = None if unpadded and k.shape[-2] >= m else nonempty_k[:, None, None, :]
        keep_k = None if unpadded else real_k[:, None, None, :]
        kernel1 = masked_softmax(q @ k_land.transpose(-1, -2), keep_kl)
        kernel2 = masked_softmax(q_land @ k_land.transpose(-1, -2), keep_kl)
        if not (unpadded or self.cross) or q.shape[-2] < m:  # some query landmark may be empty
            kernel2 = kernel2.masked_fill(~nonempty_q[:, None, :, None], 0.0)
        kernel3 = masked_softmax((q_land * scale) @ k.transpose(-1, -2), keep_k)
        # right to left: (m x m)(m x D) products instead of an (L x m)(m x m) one
        return kernel1 @ (iterative_pinv(kernel2, self.pinv_iterations) @ (kernel3 @ v))

    def reference(self, q, k, v, key_padding_mask=None):
        """Per batch row: landmarks by explicit segment boundaries ceil(j n / m) over the real positions,
        the three kernels as dense matrices, and per head the L x n approximate attention matrix
        formed explicitly and applied to the real values."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        real_k, real_q = self._real_positions(q, k, key_padding_mask)
        scale = softmax_scale(q.shape[-1])
        m = self.num_landmarks
        out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
        for b in range(q.shape[0]):
            key_idx = torch.nonzero(real_k[b]).flatten().tolist()
            query_idx = torch.nonzero(real_q[b]).flatten().tolist()
            if not key_idx:
                continue
            qs, ks, vs = q[b] * scale, k[b], v[b]  # (H, L, D): every head at once
            k_land = torch.stack([ks[:, g].mean(dim=1) for g in _segments(key_idx, m)], dim=1)
            q_land = torch.stack([qs[:, g].mean(dim=1) for g in _segments(query_idx, m)], dim=1)
            kernel1 = torch.softmax(qs @ k_land.transpose(1, 2), dim=-1)
            kernel2 = torch.softmax(q_land @ k_land.transpose(1, 2), dim=-1)
            kernel3 = torch.softmax(q_land @ ks[:, key_idx].transpose(1, 2), dim=-1)
            for h in range(q.shape[1]):
                approx = kernel1[h] @ _pinv_loop(kernel2[h], self.pinv_iterations) @ kernel3[h]  # (Lq, n)
                out[b, h] = approx @ vs[h, key_idx]
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}"


def _segments(indices: "list[int]", m: int) -> "list[list[int]]":
    """Split a list into m consecutive parts at ceil(j n / m), dropping empty parts."""
    n = len(indices)
    bounds = [-(-j * n // m) for j in range(m + 1)]
    return [indices[bounds[j]:bounds[j + 1]] for j in range(m) if bounds[j + 1] > bounds[j]]


def _pinv_loop(mat: torch.Tensor, iterations: int) -> torch.Tensor:
    """The paper's iteration written for one matrix: V <- 1/4 V (13 I - KV (15 I - KV (7 I - KV)))."""
    start = mat.abs().sum(dim=1).max() * mat.abs().sum(dim=0).max()
    z = mat.T / start
    eye = torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
    for _ in range(iterations):
        kv = mat @ z
        z = 0.25 * z @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
    return z
