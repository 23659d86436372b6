"""Local Linear Attention (LLA, M26): each query fits a softmax-kernel-weighted local *linear* regression of
the values on the keys around it and outputs the fitted value at the query. More expressive and more
expensive than softmax attention (which is the local *constant* fit): O(Lq Lk d^2) time by design."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from cab.attention.base import repeat_kv
from cab.attention.engine.kv_cache import KVCacheAttention
from cab.attention.engine.prepare import grouped_compute, softmax_scale
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention


def _outer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(..., n, a), (..., n, b) -> (..., n, a * b): the flattened outer product of each row pair."""
    return (x[..., :, None] * y[..., None, :]).flatten(-2)


def local_linear_finish(q, weight, mean_k, mean_v, second_kk, second_vk, ridge: float) -> torch.Tensor:
    """The intercept of the ridge-regularised local linear fit from the weighted moments of one query's
    visible keys (weights normalised to sum 1; weight is that sum, 0 for a query with no visible key):
    out = v_bar + Cov_vk (Cov_kk + ridge I)^-1 (q - k_bar). q (..., d), means (..., d)/(..., dv), second
    moments flattened (..., d*d)/(..., dv*d)."""
    d, dv = q.shape[-1], mean_v.shape[-1]
    cov_kk = second_kk.unflatten(-1, (d, d)) - mean_k[..., :, None] * mean_k[..., None, :]
    cov_vk = second_vk.unflatten(-1, (dv, d)) - mean_v[..., :, None] * mean_k[..., None, :]
    system = cov_kk + ridge * torch.eye(d, dtype=q.dtype, device=q.device)
    x = torch.linalg.solve(system, (q - mean_k).unsqueeze(-1))  # (..., d, 1)
    out = mean_v + (cov_vk @ x).squeeze(-1)
    return torch.where(weight > 0, out, torch.zeros_like(out))


@register_attention(
    "local_linear", patterns=("NS", "CS", "NC", "CC"), family="softmax-variant", exact=False, mechanism="M26",
    citation="Zuo et al., Local Linear Attention: An Optimal Interpolation of Linear and Softmax Attention for "
             "Test-Time Regression, arXiv 2510.01450 (2025)",
)
class LocalLinearAttention(KVCacheAttention):
    """Local Linear Attention (Zuo et al. 2025): softmax attention is the Nadaraya-Watson (local constant)
    estimator of the map k -> v at the query; LLA is the local linear one. For query q_i with kernel weights
    p_ij = softmax_j(q_i . k_j / sqrt(d)) over its visible keys, it solves

        min_{b, W}  1/2 sum_j p_ij |v_j - b - W (k_j - q_i)|^2 + ridge/2 |W|_F^2

    and outputs b = v_bar + Cov_vk (Cov_kk + ridge I)^-1 (q_i - k_bar), with the p-weighted means k_bar,
    v_bar and covariances Cov_kk = sum p (k - k_bar)(k - k_bar)^T, Cov_vk = sum p (v - v_bar)(k - k_bar)^T.
    ridge -> infinity gives back softmax attention; values linear in the keys are reproduced exactly as
    ridge -> 0. [BG] The paper regularises W with a ridge term on unnormalised kernel weights; cab
    normalises the weights (softmax probabilities) so the estimator is invariant to score shifts and
    `ridge` (default 0.1, a benchmark choice: the paper's value is not in the abstract) is relative to a
    unit total weight; a single visible key gives v_j (Cov = 0).

    THIS IS MORE EXPENSIVE THAN SOFTMAX ATTENTION BY DESIGN (the paper targets expressiveness, not speed):
    the second moments sum_j p_ij k_j k_j^T and sum_j p_ij v_j k_j^T are O(Lq Lk d^2) time, and each query
    solves a d x d system (O(Lq d^3)). The forward is the memory-efficient blockwise form in the spirit of
    FlashLLA: query chunks of `query_chunk_size` (memory O(C d^2) per chunk for the moments, nothing
    L x L), key chunks of `key_chunk_size` with two passes (the row log-sum-exp, then the normalised
    moments); key chunks wholly in the future of a causal query chunk are skipped. With gradients each query
    chunk is checkpointed (recomputed in backward, as in memory_efficient), so nothing Lq x Lk or
    (chunks x d^2) is kept: memory stays linear. The paper's
    conjugate-gradient matrix-free solve is replaced by a direct batched solve (d is a head dimension).
    Patterns: all four (the regression runs over whichever keys the pattern lets the query see; CS is
    bottom-right aligned when Lq != Lk, CC uses only the query's own row). A query with no visible key
    outputs 0. Decoding uses a KV cache (the state is the whole prefix, as for softmax). Differentiable
    everywhere (the solve included).
    """

    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, ridge: float = 0.1, query_chunk_size: int = 128,
                 key_chunk_size: int = 512):
        super().__init__(pattern, num_heads, head_dim)
        if ridge <= 0:
            raise ValueError(f"ridge must be positive, got {ridge}")
        if query_chunk_size < 1 or key_chunk_size < 1:
            raise ValueError("chunk sizes must be positive")
        self.ridge, self.query_chunk_size, self.key_chunk_size = ridge, query_chunk_size, key_chunk_size

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, ridge={self.ridge}, query_chunk_size={self.query_chunk_size}, "
                f"key_chunk_size={self.key_chunk_size}")

    def _key_ranges(self, qs: int, qe: int, lq: int, lk: int, causal: bool) -> "list[tuple[int, int]]":
        ranges = []
        for ks in range(0, lk, self.key_chunk_size):
            if causal and ks > qe - 1 + (lk - lq):
                break
            ranges.append((ks, min(lk, ks + self.key_chunk_size)))
        return ranges

    @staticmethod
    def _chunk_mask(qs, qe, ks, ke, lq, lk, keep, causal, device):
        """Bool mask of one (query chunk, key chunk) block, broadcastable to (B, H, Cq, Ck); None = all."""
        mask = None
        if causal:
            rows = torch.arange(qs, qe, device=device).unsqueeze(1) + (lk - lq)
            mask = torch.arange(ks, ke, device=device).unsqueeze(0) <= rows
        if keep is not None:
            part = keep[:, None, None, ks:ke]
            mask = part if mask is None else (mask & part)
        return mask

    def forward(self, q, k, v, key_padding_mask=None):
        return self._attend(q, k, v, key_padding_mask, self.pattern is Pattern.CS)

    def _attend(self, q, k, v, key_padding_mask, causal: bool):
        q, k, v, out_dtype = grouped_compute(q, k, v)
        lq, lk = q.shape[-2], k.shape[-2]
        keep = None if key_padding_mask is None else ~key_padding_mask.bool().to(q.device)
        use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        outputs = []
        for qs in range(0, lq, self.query_chunk_size):
            qe = min(lq, qs + self.query_chunk_size)
            ranges = self._key_ranges(qs, qe, lq, lk, causal)
            masks = [self._chunk_mask(qs, qe, ks, ke, lq, lk, keep, causal, q.device) for ks, ke in ranges]
            chunk = lambda qc, k, v, ranges=ranges, masks=masks: self._query_chunk(qc, k, v, ranges, masks)  # noqa: E731
            if use_ckpt:  # recompute the chunk in backward: its probabilities and moments are not kept
                outputs.append(checkpoint(chunk, q[:, :, qs:qe], k, v, use_reentrant=False))
            else:
                outputs.append(chunk(q[:, :, qs:qe], k, v))
        out = torch.cat(outputs, dim=-2) if len(outputs) > 1 else outputs[0]
        return out.to(out_dtype)

    def _query_chunk(self, qc, k, v, ranges, masks):
        """The outputs of one query chunk: pass 1 the row log-sum-exp over its visible keys, pass 2 the
        normalised first and second moments, then the regression's intercept."""
        dtype, scale = qc.dtype, softmax_scale(qc.shape[-1])
        lse = torch.full((*qc.shape[:-1], 1), float("-inf"), dtype=dtype, device=qc.device)
        for (ks, ke), mask in zip(ranges, masks):
            scores = (qc @ k[:, :, ks:ke].transpose(-1, -2)) * scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1, keepdim=True))
        weight = torch.isfinite(lse).to(dtype)  # 1 where the row sees a key
        safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        d, dv = qc.shape[-1], v.shape[-1]
        mean_k = qc.new_zeros(*qc.shape[:-1], d)
        mean_v = qc.new_zeros(*qc.shape[:-1], dv)
        second_kk = qc.new_zeros(*qc.shape[:-1], d * d)
        second_vk = qc.new_zeros(*qc.shape[:-1], dv * d)
        for (ks, ke), mask in zip(ranges, masks):
            kc, vc = k[:, :, ks:ke], v[:, :, ks:ke]
            scores = (qc @ kc.transpose(-1, -2)) * scale
            if mask is not None:  # before the exp: an invisible score (a padded key's garbage, a future key
                # under CS) may exceed the row's log-sum-exp by more than the exp range, and exp(inf) masked
                # afterwards still sends 0 * inf = NaN back; exp(-inf) = 0 has a zero derivative
                scores = scores.masked_fill(~mask, float("-inf"))
            p = torch.exp(scores - safe_lse)
            mean_k = mean_k + p @ kc
            mean_v = mean_v + p @ vc
            second_kk = second_kk + p @ _outer(kc, kc)
            second_vk = second_vk + p @ _outer(vc, kc)
        return local_linear_finish(qc, weight, mean_k, mean_v, second_kk, second_vk, self.ridge)

    def reference(self, q, k, v, key_padding_mask=None):
        """Each query row's weighted least-squares problem itself, all rows at once: design
        [1, (k_j - q_i)^T] (B, H, Lq, Lk, d+1), weights p_ij, the ridge on the slope block only, solved by
        the normal equations; the intercept is the output. (No moments, no centring identity.)"""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        visible = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, q.device)
        visible = visible.expand(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        d = q.shape[-1]
        penalty = torch.diag(torch.cat([q.new_zeros(1), q.new_full((d,), self.ridge)]))
        scores = (q @ k.transpose(-1, -2)) * softmax_scale(d)  # (B, H, Lq, Lk)
        seen = visible.any(dim=-1, keepdim=True)
        scores = torch.where(seen, scores.masked_fill(~visible, float("-inf")), torch.zeros_like(scores))
        p = torch.softmax(scores, dim=-1) * seen  # (B, H, Lq, Lk)
        design = torch.cat([torch.ones_like(k[:, :, None, :, :1]).expand(-1, -1, q.shape[-2], -1, -1),
                            k[:, :, None] - q[:, :, :, None]], dim=-1)  # (B, H, Lq, Lk, d + 1)
        gram = design.transpose(-1, -2) @ (p[..., None] * design) + penalty
        rhs = design.transpose(-1, -2) @ (p[..., None] * v[:, :, None])  # (B, H, Lq, d + 1, Dv)
        # rows that see nothing: solve an identity system and zero the result
        gram = torch.where(seen[..., None], gram, torch.eye(d + 1, dtype=q.dtype, device=q.device))
        theta = torch.linalg.solve(gram, rhs)
        return theta[..., 0, :] * seen

    def algorithmic_flops(self, batch, lq, lk, kv_heads):
        """Matmuls of the visited (query chunk, key chunk) pairs: scores twice (two passes), p K, p V and
        the second moments p (k k^T), p (v k^T); plus Cov_vk x per query (the d x d solves are not matmuls)."""
        h, d = self.num_heads, self.head_dim
        total = 0
        for qs in range(0, lq, self.query_chunk_size):
            qe = min(lq, qs + self.query_chunk_size)
            for ks, ke in self._key_ranges(qs, qe, lq, lk, self.pattern is Pattern.CS):
                pairs = (qe - qs) * (ke - ks)
                total += 2 * batch * h * pairs * (d + d + d + d + d * d + d * d)
        return total + 2 * batch * h * lq * d * d

    def attend_cached(self, q, keys, values, real):
        """One decoding query over the cached keys: the same blockwise computation with a padding mask."""
        return self._attend(q, keys, values, None if real is None else ~real, causal=False)
