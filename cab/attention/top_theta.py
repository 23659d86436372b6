"""Top-Theta attention: keep the scores at or above a calibrated per-head threshold (no sorting), with the
softmax denominator and the pruned values compensated."""

from __future__ import annotations

import torch

from cab.attention.base import Attention, repeat_kv
from cab.attention.engine.prepare import query_positions, real_keys, softmax_scale
from cab.patterns import Pattern, attention_mask
from cab.registry import register_attention

_ELEMENTS = 1 << 24  # scores held at once
COMPENSATIONS = ("none", "sdc", "vmc")


@register_attention(
    "top_theta", patterns=("NS", "CS", "NC", "CC"), family="sparse", exact=False, mechanism="M43",
    citation="Berestizshevsky et al., Top-Theta Attention: Sparsifying Transformers by Compensated "
    "Thresholding, arXiv preprint 2025",
)
class TopThetaAttention(Attention):
    """Top-theta thresholded attention (Berestizshevsky et al. 2025, Sec. 3-4).

    Each head h has a static threshold theta_h on the scaled scores s_ij = q_i . k_j / sqrt(d); a visible
    key is kept iff s_ij >= theta_h (a comparison per element, no sort, so rows keep a varying number of
    keys, about the calibration target on average). Compensation (`compensation`):
    - "none": softmax renormalised over the kept keys only.
    - "sdc" (softmax denominator compensation): the denominator sums exp(s_ij) over every visible key, so
      kept probabilities are the exact ones and the pruned mass is dropped.
    - "vmc" (V-mean compensation, default): "sdc" plus the pruned mass times the mean of the pruned
      values: o_i = sum_kept p_ij v_j + (1 - sum_kept p_ij) mean_{j pruned} v_j.
    [BG] The paper estimates the pruned part of the denominator; here every score is computed anyway (the
    threshold must see it), so the exact denominator costs nothing extra.

    Thresholds: a buffer `theta` (H,), initialised to the hyper-parameter `theta` (default 2.0: for
    unit-variance q, k the scaled scores are ~N(0, 1), and s >= 2 keeps ~2.3% of the keys); `calibrate(q,
    k)` sets each head's threshold to the mean over rows of the row's `calibrate_k`-th largest visible score
    (the paper calibrates per head, and per row length, so that rows keep k elements; one threshold per
    head here).

    Cost: the thresholding needs every score, so QK^T is O(Lq Lk d) (the paper's algorithm: the saving is
    in the values loaded and multiplied, and no sort); processed in chunks of query rows, no Lq x Lk tensor
    at once. computed_pairs counts every scored (visible) pair, so achieved sparsity is 0 by that measure;
    `kept_pairs` counts the pairs kept by the threshold (the V-side sparsity the paper reports).
    Patterns: the decision of pair (i, j) reads only q_i and k_j, so every pattern is leak-free; CS query i
    sits at key position i + Lk - Lq. The threshold test is not differentiable; gradients flow through the
    kept probabilities, the denominator and the value means. No FlexAttention path: a score_mod could
    threshold, but the compensations need the pruned mass and pruned-value means of each row.
    """

    # every score is computed; memory is chunked
    complexity = {"time": 2, "memory": 1}

    def __init__(self, pattern, num_heads, head_dim, theta: float = 2.0, compensation: str = "vmc",
                 calibrate_k: int = 64):
        super().__init__(pattern, num_heads, head_dim)
        if compensation not in COMPENSATIONS:
            raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
        self.compensation, self.calibrate_k = compensation, calibrate_k
        self.register_buffer("theta", torch.full((num_heads,), float(theta)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compensation={self.compensation!r}"

    @torch.no_grad()
    def calibrate(self, q, k, key_padding_mask=None) -> torch.Tensor:
        """Set theta_h to the mean over rows of the calibrate_k-th largest visible scaled score of head h."""
        k = repeat_kv(k, q.shape[1])
        s = (q @ k.transpose(-1, -2)) * softmax_scale(q.shape[-1])
        mask = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, device=q.device)
        s = s.masked_fill(~mask, float("-inf"))
        kth = s.topk(min(self.calibrate_k, s.shape[-1]), dim=-1).values[..., -1]
        ok = torch.isfinite(kth)
        mean = (kth.where(ok, torch.zeros_like(kth))).sum((0, 2)) / ok.sum((0, 2)).clamp_min(1)
        self.theta.copy_(mean.to(self.theta))
        return self.theta

    def _rows(self, q, k, v, real, rows):
        """(scores (B, H, n, Lk), visible, kept) of the query rows `rows`."""
        lq, lk = q.shape[-2], k.shape[-2]
        s = (q[:, :, rows] * softmax_scale(q.shape[-1])) @ k.transpose(-1, -2)
        visible = real[:, None, None, :]
        if self.pattern is Pattern.CS:
            positions = query_positions(lq, lk, q.device)[rows, None]
            visible = visible & (torch.arange(lk, device=q.device)[None, :] <= positions)
        with torch.no_grad():
            kept = visible & (s >= self.theta.to(s.dtype)[None, :, None, None])
        return s, visible.expand_as(s), kept

    def _chunks(self, q, lk):
        step = max(1, _ELEMENTS // max(1, q.shape[0] * q.shape[1] * lk))
        return [slice(r0, min(r0 + step, q.shape[-2])) for r0 in range(0, q.shape[-2], step)]

    def forward(self, q, k, v, key_padding_mask=None):
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        real = real_keys(key_padding_mask, q.shape[0], k.shape[-2], q.device)
        outs = []
        for rows in self._chunks(q, k.shape[-2]):
            s, visible, kept = self._rows(q, k, v, real, rows)
            norm = kept if self.compensation == "none" else visible
            # mask before the exp: a score outside `norm` (a padded key holding garbage, a future key under CS)
            # may exceed the row's max by more than the dtype's exp range; exp(inf) masked to 0 afterwards
            # would still send 0 * inf = NaN back through the exp's derivative. exp(-inf) = 0 has a zero one.
            s_norm = s.masked_fill(~norm, float("-inf"))
            mx = s_norm.amax(-1, keepdim=True)
            empty = torch.isinf(mx)
            e = torch.exp(s_norm - torch.where(empty, torch.zeros_like(mx), mx))
            den = e.sum(-1, keepdim=True)
            p = e.masked_fill(~kept, 0.0) / torch.where(empty, torch.ones_like(den), den)
            out = p @ v
            if self.compensation == "vmc":
                pruned = (visible & ~kept).to(v.dtype)
                count = pruned.sum(-1, keepdim=True)
                mean = (pruned @ v) / count.clamp_min(1)
                out = out + (1 - p.sum(-1, keepdim=True)) * mean * (count > 0)
            outs.append(out)
        return torch.cat(outs, dim=2)

    def computed_pairs(self, q, k, v, key_padding_mask=None):
        """Every visible pair is scored (the threshold must see each score)."""
        mask = attention_mask(self.pattern, q.shape[-2], k.shape[-2], key_padding_mask, device=q.device)
        return q.shape[1] * int(mask.expand(q.shape[0], 1, q.shape[-2], k.shape[-2]).sum())

    def kept_pairs(self, q, k, v, key_padding_mask=None) -> int:
        """(batch, head, query, key) pairs kept by the thresholds (those whose values are multiplied)."""
        k = repeat_kv(k, q.shape[1])
        real = real_keys(key_padding_mask, q.shape[0], k.shape[-2], q.device)
        with torch.no_grad():
            return sum(int(self._rows(q, k, k, real, rows)[2].sum()) for rows in self._chunks(q, k.shape[-2]))

    def reference(self, q, k, v, key_padding_mask=None):
        """Row by row with explicit lists of visible, kept and pruned keys."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        real = real_keys(key_padding_mask, b, lk, q.device).cpu()
        out = torch.zeros(b, h, lq, v.shape[-1], dtype=v.dtype, device=v.device)
        for bi in range(b):
            for hi in range(h):
                theta = float(self.theta[hi])
                for i in range(lq):
                    vis = [j for j in range(lk) if real[bi, j] and (self.pattern is not Pattern.CS or j <= i + lk - lq)]
                    if not vis:
                        continue
                    s = (k[bi, hi, vis] @ q[bi, hi, i]) * softmax_scale(d)
                    sd = s.detach()
                    keep = [n for n in range(len(vis)) if float(sd[n]) >= theta]
                    drop = [n for n in range(len(vis)) if float(sd[n]) < theta]
                    if not keep:
                        if self.compensation == "vmc":
                            out[bi, hi, i] = v[bi, hi, vis].mean(0)
                        continue
                    z = torch.exp(s[keep]).sum() if self.compensation == "none" else torch.exp(s).sum()
                    p = torch.exp(s[keep]) / z
                    row = p @ v[bi, hi, [vis[n] for n in keep]]
                    if self.compensation == "vmc" and drop:
                        row = row + (1 - p.sum()) * v[bi, hi, [vis[n] for n in drop]].mean(0)
                    out[bi, hi, i] = row
        return out
