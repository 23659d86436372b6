"""Routing Transformer attention: queries and keys are routed to their nearest of C centroids (online
k-means on the unit sphere, centroids updated by an exponential moving average), and each query attends to
the keys of its own cluster."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import query_positions, real_keys, softmax_scale
from cab.attention.engine.routing import gathered_attention
from cab.attention.engine.scores import masked_softmax_reference
from cab.patterns import Pattern
from cab.registry import register_attention


@register_attention(
    "routing", patterns=("NS", "CS", "NC", "CC"), family="routing", exact=False, mechanism="M38",
    citation="Roy et al., Efficient Content-Based Sparse Attention with Routing Transformers, TACL 2021",
)
class RoutingAttention(Attention):
    """Routing attention (Roy et al. 2021, Sec. 4, Eqs. 9-12).

    Queries and keys are normalised to the unit sphere; each is assigned to its nearest centroid mu_c
    (argmax_c mu_c . x / |x|, C = `num_clusters` per head, a buffer initialised from `seed` as unit
    Gaussian vectors). Query i attends, with ordinary scaled softmax over the unnormalised q, k, to the
    visible keys j with cluster(k_j) = cluster(q_i) (Eq. 9 with the routing sparsity pattern). Centroids are
    updated by the EMA of Eq. 12, mu <- lambda mu + (1 - lambda) mean of the normalised queries and keys
    assigned to mu (then renormalised), `ema_decay` = lambda = 0.999 as in the paper.

    Choices and why:
    - [BG] Assignment is the plain nearest-centroid argmax for every pattern. The paper's balanced variant
      (each centroid takes its top-w nearest tokens) makes a token's membership depend on the other tokens:
      under CS a later key or query could evict an earlier one from a cluster, a leak. With argmax, query
      i's keys depend only on q_i, the centroids and the keys themselves (CS: keys <= i + Lk - Lq,
      bottom-right), and nothing of other queries (CC).
    - The EMA update runs in training mode only when `update_centroids=True` (default False), after the
      output is computed, from the real (unpadded) tokens of the call. It is off by default because a
      forward that moves module state makes two identical calls disagree, which cab's conformance checks
      (and any forward-vs-reference comparison) reject; a training loop that wants online k-means turns
      it on. Centroids are state, not parameters (no gradient, as in the paper).
    - The paper mixes local-attention heads with routing heads; that is a per-head model configuration
      (use `local` for those heads) and not part of this operator.
    The routing (argmax) is not differentiable; gradients flow through the softmax within clusters.

    Efficient path: keys are sorted by cluster; every query gathers the (at most M = largest cluster) keys
    of its cluster, in chunks: O(Lq M d), ~O(Lq Lk d / C) when clusters are balanced (the paper's
    O(n^1.5 d) with C = sqrt(n)); an unbalanced clustering costs up to O(Lq Lk d). No Lq x Lk tensor.
    Default C = 32 (sqrt of a 1024-token sequence; the paper uses C ~ sqrt(n)). No FlexAttention path: the
    mask is content-dependent per call.
    """

    # L^2/C pairs and an Lq x (largest cluster) index tensor for a fixed number of clusters
    complexity = {"time": 2, "memory": 2}

    def __init__(self, pattern, num_heads, head_dim, num_clusters: int = 32, ema_decay: float = 0.999,
                 update_centroids: bool = False, seed: int = 0):
        super().__init__(pattern, num_heads, head_dim)
        if num_clusters < 1 or not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"need num_clusters >= 1 and 0 <= ema_decay <= 1, got {num_clusters}, {ema_decay}")
        self.num_clusters, self.ema_decay = num_clusters, ema_decay
        self.update_centroids, self.seed = update_centroids, seed
        gen = torch.Generator().manual_seed(seed)
        mu = torch.randn(num_heads, num_clusters, head_dim, generator=gen)
        self.register_buffer("centroids", mu / mu.norm(dim=-1, keepdim=True))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_clusters={self.num_clusters}, ema_decay={self.ema_decay}"

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster of every row of x (B, H, L, D): argmax_c mu_c . x / |x| (ties to the lower c)."""
        with torch.no_grad():
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return torch.einsum("bhld,hcd->bhlc", x, self.centroids.to(x.dtype)).argmax(-1)

    def _select(self, q, k, key_padding_mask):
        """(idx (B, H, Lq, M), valid) keys of each query's cluster."""
        b, h, lq, _ = q.shape
        lk, c = k.shape[-2], self.num_clusters
        real = real_keys(key_padding_mask, b, lk, q.device)
        kc = torch.where(real[:, None, :], self.assign(k), c)  # padded keys in an extra cluster c
        qc = self.assign(q)
        order = torch.argsort(kc * lk + torch.arange(lk, device=q.device), dim=-1)  # by (cluster, position)
        counts = torch.nn.functional.one_hot(kc, c + 1).sum(2)  # (B, H, C + 1)
        starts = torch.cumsum(counts, -1) - counts
        width = max(1, int(counts[..., :c].max()))
        m = torch.arange(width, device=q.device)
        start_q = starts.gather(-1, qc)  # (B, H, Lq)
        count_q = counts.gather(-1, qc)
        slot = (start_q[..., None] + m).clamp(max=lk - 1)
        idx = order.gather(-1, slot.reshape(b, h, -1)).reshape(b, h, lq, width)
        valid = m < count_q[..., None]
        if self.pattern is Pattern.CS:
            valid = valid & (idx <= query_positions(lq, lk, q.device)[:, None])
        return idx, valid

    @torch.no_grad()
    def ema_update(self, q, k, key_padding_mask=None) -> None:
        """One EMA step of the centroids from the real queries and keys of a call (Eq. 12)."""
        k = repeat_kv(k, q.shape[1])
        real = real_keys(key_padding_mask, k.shape[0], k.shape[-2], k.device)
        xs = [(q, torch.ones(q.shape[0], q.shape[-2], dtype=torch.bool, device=q.device)), (k, real)]
        if not self.cross and q.shape[-2] == k.shape[-2]:
            xs[0] = (q, real)
        total = torch.zeros_like(self.centroids)
        count = torch.zeros(self.centroids.shape[:2], device=q.device)
        for x, ok in xs:
            cl = self.assign(x)
            xn = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(total.dtype)
            onehot = torch.nn.functional.one_hot(cl, self.num_clusters).to(total.dtype) * ok[:, None, :, None]
            total += torch.einsum("bhlc,bhld->hcd", onehot, xn)
            count += onehot.sum((0, 2))
        moved = count > 0
        mean = total / count.clamp_min(1)[..., None]
        new = self.ema_decay * self.centroids + (1 - self.ema_decay) * mean
        new = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.centroids.copy_(torch.where(moved[..., None], new, self.centroids))

    def forward(self, q, k, v, key_padding_mask=None):
        kr, vr = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        idx, valid = self._select(q.detach(), kr.detach(), key_padding_mask)
        out = gathered_attention(q[:, :, :, None], kr, vr, idx, valid[:, :, :, None], softmax_scale(q.shape[-1]))
        if self.training and self.update_centroids:
            self.ema_update(q.detach(), k.detach(), key_padding_mask)
        return out[:, :, :, 0]

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Pairs within clusters that are visible (the gathered slots beyond a cluster's size are not counted)."""
        with torch.no_grad():
            return int(self._select(q, repeat_kv(k, q.shape[1]), key_padding_mask)[1].sum())

    def reference(self, q, k, v, key_padding_mask=None):
        """Clusters by an explicit per-token loop over the centroids, the same-cluster visible keys listed
        explicitly, a dense softmax row per query."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        real = real_keys(key_padding_mask, b, lk, q.device).cpu()

        def cluster(x):
            x = x.detach() / x.detach().norm().clamp_min(1e-12)
            sims = [float(self.centroids[hi, c].to(x.dtype) @ x) for c in range(self.num_clusters)]
            return max(range(self.num_clusters), key=lambda c: (sims[c], -c))

        allowed = torch.zeros(b, h, lq, lk, dtype=torch.bool)
        for bi in range(b):
            for hi in range(h):
                kcl = [cluster(k[bi, hi, j]) for j in range(lk)]
                for i in range(lq):
                    ci = cluster(q[bi, hi, i])
                    for j in range(lk):
                        if real[bi, j] and kcl[j] == ci and (self.pattern is not Pattern.CS or j <= i + lk - lq):
                            allowed[bi, hi, i, j] = True
        return masked_softmax_reference(q, k, v, allowed.to(q.device), softmax_scale(d))
