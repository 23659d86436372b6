"""LARA: linear randomized attention — self-normalised multiple importance sampling of softmax attention
with one Gaussian proposal per segment-mean landmark, O(L C d)."""

from __future__ import annotations

import math

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import compute_dtype
from cab.patterns import Pattern
from cab.registry import register_attention

_CAUSAL = ("the segment-mean proposals pool over the whole sequence, future tokens included; a causal LARA "
           "needs per-prefix proposals, which the paper does not define (its successor EVA does)")


def segment_ids(real: torch.Tensor, segments: int) -> torch.Tensor:
    """Segment index (0..segments-1) of every real position, counting real positions only, so that
    padding anywhere does not move a boundary; -1 at padded positions. real (B, L) bool.

    The r-th of n real positions goes to segment floor(r * segments / n): `segments` contiguous runs
    whose sizes differ by at most one (some are empty when n < segments)."""
    rank = real.long().cumsum(dim=-1) - 1
    count = real.long().sum(dim=-1, keepdim=True).clamp_min(1)
    return torch.where(real, torch.div(rank * segments, count, rounding_mode="floor"), -1)


def segment_means(x: torch.Tensor, real: "torch.Tensor | None", segments: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """(means (B, H, segments, D), counts (B, segments)) of x (B, H, L, D) over the segments of its real
    positions (real (B, L) bool; None: every position is real); an empty segment has mean 0 and count 0.

    With every position real and L a multiple of `segments` the segments are equal consecutive blocks: a
    reshape-mean (CAB's pooling), without the (B, L, segments) one-hot matrix and its product."""
    b, h, length, d = x.shape
    if real is None and length % segments == 0:
        counts = torch.full((b, segments), float(length // segments), dtype=x.dtype, device=x.device)
        return x.reshape(b, h, segments, length // segments, d).mean(dim=-2), counts
    if real is None:
        real = torch.ones(b, length, dtype=torch.bool, device=x.device)
    ids = segment_ids(real, segments)
    onehot = (ids.unsqueeze(-1) == torch.arange(segments, device=x.device)).to(x.dtype)  # (B, L, C)
    counts = onehot.sum(dim=1)
    sums = onehot.transpose(-1, -2).unsqueeze(1) @ x  # (B, H, C, D)
    return sums / counts.clamp_min(1)[:, None, :, None], counts


@register_attention(
    "lara", patterns=("NS", "NC", "CC"), family="linear", exact=False, version=2,
    citation="Zheng, Wang & Kong, Linear Complexity Randomized Self-attention Mechanism, ICML 2022",
    unsupported={"CS": _CAUSAL},
)
class LaraAttention(Attention):
    """LARA (paper Sec. 4): softmax attention SA(q_n) = E_{p_n(w)}[f(w)] with p_n(w) = sum_m pi_nm
    N(w; q_n + k_m, I) and f(w) = sum_m xi(k_m, w) v_m / sum_m xi(k_m, w), xi(x, w) = exp(w^T x - |x|^2/2)
    (q, k scaled by d^-1/4), is estimated by self-normalised multiple importance sampling with C proposals
    N(mu_c, I), one sample w_c each:

        LARA(q_n) = sum_c r_nc f(w_c) / sum_c r_nc,
        r_nc = alpha_nc p_n(w_c) / N(w_c; mu_c, I)
             ~ exp(q_n^T mu_c) xi(q_n, w_c) sum_m xi(k_m, w_c) / xi(mu_c, w_c),

    with query-specific weights alpha_nc = softmax_c(q_n^T mu_c) (CAB's choice) and per-query constants
    cancelled. Proposal means mu_c = qbar_c + kbar_c, the means of C contiguous segments
    (`num_landmarks`, CAB's default 16) of the queries and of the keys; a segment that is empty (fewer
    real positions than C) is dropped from the mixture.

    Samples: with `seed=None` (default) w_c = mu_c, the deterministic estimator CAB evaluated; with an
    integer seed w_c = mu_c + eps_c, eps ~ N(0, I) per head, drawn once at construction from a generator
    seeded by it and fixed (never redrawn; CAB redrew in training mode).

    Padding: segment means, proposal sums and f(w) run over real keys only and segment boundaries count
    real positions only (CAB's LARA pooled padded positions into its landmarks and normalisers); in NS
    with Lq == Lk the key padding mask marks the padded queries as well. CC keeps the keys' proposal
    part only (mu_c = kbar_c), since query means pool later queries; CS is unsupported (see the reason).
    Scaling: xi uses d^-1/4-scaled q and k (and means), so that E[xi(q, w) xi(k, w)] = exp(q^T k / sqrt(d))
    for w ~ N(0, I). CAB's code instead multiplies the data by 1/sqrt(d) inside its projections and adds
    its noise to unscaled means. At w_c = mu_c (CAB's eval mode, cab's seed=None) the two are the same
    estimator: benchmarks/vs_cab.py finds them equal to round-off in float64 whenever L is a multiple of C.
    With noise they differ: in cab's scaled coordinates CAB's samples are mu_c + d^-1/4 eps_c, while its
    importance weights, like cab's, assume the unit-variance proposal N(mu_c, I). When C does not divide the
    length, CAB makes its first segments floor(L / C) long and the last ones one longer; cab's rule
    (segment floor(r C / n)) spreads the longer segments evenly, so the means differ.
    """

    def __init__(self, pattern, num_heads, head_dim, num_landmarks: int = 16, seed: "int | None" = None):
        super().__init__(pattern, num_heads, head_dim)
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be positive, got {num_landmarks}")
        self.num_landmarks = num_landmarks
        self.seed = seed
        noise = torch.zeros(num_heads, num_landmarks, head_dim, dtype=torch.float64)
        if seed is not None:
            noise = torch.randn(num_heads, num_landmarks, head_dim, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(seed))
        self.register_buffer("noise", noise.to(torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_landmarks={self.num_landmarks}, seed={self.seed}"

    def proposals(
        self, q: torch.Tensor, k: torch.Tensor, key_padding_mask: "torch.Tensor | None"
    ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]":
        """(mu (B, H, C, D), samples w (B, H, C, D), valid (B, 1, 1, C) or None when every proposal is
        valid), from the unscaled q and k: mu is the sum of their segment means times d^-1/4 (the means of
        the scaled q and k), w = mu + noise."""
        real_k = None if key_padding_mask is None else ~key_padding_mask.bool()
        mu, counts = segment_means(k, real_k, self.num_landmarks)
        valid = counts > 0
        if self.pattern is not Pattern.CC:
            self_padded = self.pattern is Pattern.NS and q.shape[-2] == k.shape[-2]
            q_mean, q_count = segment_means(q, real_k if self_padded else None, self.num_landmarks)
            mu = mu + q_mean
            valid = valid & (q_count > 0)
        mu = mu * q.shape[-1] ** -0.25
        samples = mu + self.noise.to(mu.dtype)
        return mu, samples, None if bool(valid.all()) else valid[:, None, None, :]

    def forward(self, q, k, v, key_padding_mask=None):
        """The docstring's estimator with q and k never scaled at full length: with s = d^-1/4,
        log xi(s x, w) = (s w).x - s^2 |x|^2 / 2, and in log r_nc the query's own term -s^2 |q_n|^2 / 2 is the
        same for every c, so the softmax over c drops it. The key-side terms are laid out (C, Lk), so that
        their softmax and logsumexp over the keys run along contiguous memory (CAB's layout)."""
        out_dtype = q.dtype
        dtype = compute_dtype(q.dtype)
        s = q.shape[-1] ** -0.25
        q = q.to(dtype)
        k, v = repeat_kv(k, q.shape[1]).to(dtype), repeat_kv(v, q.shape[1]).to(dtype)
        mu, w, valid = self.proposals(q, k, key_padding_mask)
        lowest = torch.finfo(dtype).min
        # log xi(s k_m, w_c), (B, H, C, Lk)
        log_xi_k = (w * s) @ k.transpose(-1, -2) - (0.5 * s * s) * (k * k).sum(-1).unsqueeze(-2)
        if key_padding_mask is not None:
            log_xi_k = log_xi_k.masked_fill(key_padding_mask.bool()[:, None, None, :], lowest)
        f_w = torch.softmax(log_xi_k, dim=-1) @ v  # (B, H, C, Dv): f(w_c)
        log_sum_xi_k = torch.logsumexp(log_xi_k, dim=-1)  # (B, H, C)
        log_xi_mu = (w * mu).sum(-1) - 0.5 * (mu * mu).sum(-1)  # (B, H, C)
        # log r_nc up to a per-query constant: (s q_n).mu_c + (s q_n).w_c + log sum_m xi(k_m, w_c) - log xi(mu_c, w_c)
        log_ratio = q @ ((mu + w) * s).transpose(-1, -2) + (log_sum_xi_k - log_xi_mu).unsqueeze(-2)
        if valid is None:
            return (torch.softmax(log_ratio, dim=-1) @ f_w).to(out_dtype)
        weights = torch.softmax(log_ratio.masked_fill(~valid, lowest), dim=-1) * valid
        return (weights @ f_w).to(out_dtype)

    def reference(self, q, k, v, key_padding_mask=None):
        """The importance weights from the explicit densities, sample by sample: the mixture
        p_n(w_c) = sum_m pi_nm N(w_c; q_n + k_m, I) over the real keys (an Lq x Lk x D tensor per sample)
        and the proposal N(w_c; mu_c, I), with f_n(w_c) = sum_m xi(q_n, w_c) xi(k_m, w_c) v_m /
        sum_m xi(q_n, w_c) xi(k_m, w_c). The proposals are re-derived here, not taken from `proposals`:
        segment c of n real positions (listed in order) is the slice ceil(c n / C) .. ceil((c + 1) n / C) - 1,
        mu_c = mean of its keys + (NS, NC) mean of its queries, w_c = mu_c + noise_c."""
        scale = q.shape[-1] ** -0.25
        q = q * scale
        k, v = repeat_kv(k, q.shape[1]) * scale, repeat_kv(v, q.shape[1])
        dim, segments = q.shape[-1], self.num_landmarks

        def segment(positions: "list[int]", c: int) -> "list[int]":
            n = len(positions)
            return positions[-(-c * n // segments):-(-(c + 1) * n // segments)]

        def log_normal(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
            return -0.5 * ((x - mean) ** 2).sum(-1) - 0.5 * dim * math.log(2 * math.pi)

        self_padded = self.pattern is Pattern.NS and q.shape[-2] == k.shape[-2]  # padded keys mark padded queries
        out = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
        for b in range(q.shape[0]):
            real_keys = [j for j in range(k.shape[-2]) if key_padding_mask is None or not key_padding_mask[b, j]]
            real_queries = real_keys if self_padded else list(range(q.shape[-2]))
            kb, vb, qb = k[b][:, real_keys], v[b][:, real_keys], q[b]  # (H, M, D), (H, M, Dv), (H, Lq, D)
            log_pi = torch.log_softmax(qb @ kb.transpose(-1, -2), dim=-1)  # (H, Lq, M)
            centres = qb.unsqueeze(-2) + kb.unsqueeze(-3)  # (H, Lq, M, D): the mixture components' means
            log_ratios, estimates = [], []
            for c in range(segments):
                key_members, query_members = segment(real_keys, c), segment(real_queries, c)
                if not key_members or (self.pattern is not Pattern.CC and not query_members):
                    continue  # an empty segment: no proposal
                muc = torch.stack([k[b, :, j] for j in key_members]).mean(dim=0)  # (H, D)
                if self.pattern is not Pattern.CC:
                    muc = muc + torch.stack([q[b, :, i] for i in query_members]).mean(dim=0)
                wc = muc + self.noise[:, c].to(muc.dtype)
                log_p = torch.logsumexp(log_pi + log_normal(wc[:, None, None, :], centres), dim=-1)  # (H, Lq)
                log_proposal = log_normal(wc, muc).unsqueeze(-1)  # (H, 1)
                log_alpha = qb @ muc.unsqueeze(-1)  # (H, Lq, 1): alpha_nc up to a per-query constant
                log_ratios.append(log_alpha.squeeze(-1) + log_p - log_proposal)
                xi_q = torch.exp(qb @ wc.unsqueeze(-1) - 0.5 * (qb * qb).sum(-1, keepdim=True))  # (H, Lq, 1)
                xi_k = torch.exp(kb @ wc.unsqueeze(-1) - 0.5 * (kb * kb).sum(-1, keepdim=True))  # (H, M, 1)
                joint = xi_q @ xi_k.transpose(-1, -2)  # (H, Lq, M)
                estimates.append((joint @ vb) / joint.sum(-1, keepdim=True))
            if log_ratios:
                ratio = torch.softmax(torch.stack(log_ratios, dim=-1), dim=-1)  # (H, Lq, C')
                out[b] = (ratio.unsqueeze(-2) @ torch.stack(estimates, dim=-2)).squeeze(-2)
        return out
